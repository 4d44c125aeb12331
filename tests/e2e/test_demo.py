"""`gateway demo` prints snippets that work as printed: a generation, then an edit of its result;
and the usage page's URL with an admin token that opens the admin API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


def banner(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    lines: list[str] = []
    rules = 0
    for line in process.stdout:
        lines.append(line)
        rules += line.startswith("=====")
        if rules == 2:
            return "".join(lines)
    raise AssertionError("the demo ended before printing its banner:\n" + "".join(lines))


def snippets(text: str) -> list[str]:
    """The shell commands of the banner: each curl command, each python heredoc."""
    curls = re.findall(r"^curl .*(?:\n[ \t]+.*)*", text, re.M)
    pythons = re.findall(r"^\.venv/bin/python - <<'PY'\n.*?\nPY$", text, re.M | re.S)
    return curls + pythons


@pytest.mark.slow
def test_the_demo_snippets_work_as_printed(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        text = banner(process)
        generate_curl, edit_curl, generate_py, edit_py = snippets(text)
        assert "/v1/images/edits" in edit_curl and "images.edit(" in edit_py

        def run(command: str) -> str:
            command = command.replace(".venv/bin/python", sys.executable)
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                env=os.environ,
            )
            assert result.returncode == 0, result.stderr
            return result.stdout

        assert '"data"' in run(generate_curl)
        assert "saved lighthouse.png" in run(generate_py)
        assert '"data"' in run(edit_curl)
        assert "saved lighthouse-night.png" in run(edit_py)
        assert (tmp_path / "lighthouse-night.png").stat().st_size > 0

        page = re.search(r"^Usage page: (http://\S+/admin/ui) +admin token: (\S+)$", text, re.M)
        assert page is not None, text
        url, token = page.groups()
        with urllib.request.urlopen(url, timeout=30) as response:
            assert b"<title>Image gateway usage</title>" in response.read()
        ask = urllib.request.Request(
            url.replace("/ui", "/tenants"), headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(ask, timeout=30) as response:
            assert b'"demo-team"' in response.read()
    finally:
        process.terminate()
        process.wait(timeout=30)
