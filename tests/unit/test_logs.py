"""`logs.info`, the access log's way to write its line, writes what structlog's JSON configuration
writes for the same call (keys, their order, values), and defers to structlog under any other."""

from __future__ import annotations

import datetime
import io
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from gateway import logs

FIELDS: dict[str, Any] = {
    "method": "POST",
    "status": 200,
    "tenant": "team",
    "key": None,
    "stream": False,
    "duration_ms": 12.345,
    "attempts": [{"upstream": "openai", "outcome": "ok", "duration_ms": 1.5}],
    "prompt_chars": 12,
    "usd": 0.011,
}
_TS = re.compile(rb'"ts":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"')


@pytest.fixture
def json_stdout(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.BytesIO]:
    """Logging configured as `gateway serve` configures it, its stdout a buffer; undone after."""
    buffer = io.BytesIO()
    stdout = io.TextIOWrapper(buffer)  # kept: collected, it would close the buffer
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(logs, "_json_lines", None)
    old_handlers = list(logging.getLogger().handlers)
    logs.configure_logging("info", "json")
    yield buffer
    stdout.detach()
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = old_handlers


def test_the_json_line_is_structlogs_own(json_stdout: io.BytesIO) -> None:
    structlog.contextvars.bind_contextvars(request_id="r1")
    try:
        structlog.get_logger("gateway.access").info("request_finished", **FIELDS)
        logs.info(structlog.get_logger("gateway.access"), "request_finished", dict(FIELDS))
    finally:
        structlog.contextvars.clear_contextvars()
    by_structlog, written = json_stdout.getvalue().splitlines()
    assert _TS.search(written)
    assert _TS.sub(b"", written) == _TS.sub(b"", by_structlog)
    line = orjson.loads(written)
    assert list(line) == [*FIELDS, "event", "request_id", "level", "ts"]


def test_under_any_other_configuration_it_is_the_loggers_info(json_stdout: io.BytesIO) -> None:
    with capture_logs() as captured:
        logs.info(structlog.get_logger("gateway.access"), "request_finished", dict(FIELDS))
    assert captured == [{**FIELDS, "event": "request_finished", "log_level": "info"}]
    assert json_stdout.getvalue() == b""


def test_above_info_nothing_is_written(json_stdout: io.BytesIO) -> None:
    logs.configure_logging("warning", "json")
    logs.info(structlog.get_logger("gateway.access"), "request_finished", dict(FIELDS))
    assert json_stdout.getvalue() == b""


def test_the_time_is_structlogs_to_the_microsecond_and_its_second_follows_the_clock(
    json_stdout: io.BytesIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = logs._json_lines
    assert lines is not None
    for now_ns in (1_796_643_045_123_456_789, 1_796_643_045_999_999_999, 1_796_643_046_000_000_999, 0):
        with monkeypatch.context() as patch:
            patch.setattr(logs.time, "time_ns", lambda now_ns=now_ns: now_ns)
            seconds, micros = divmod(now_ns // 1000, 1_000_000)
            expected = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).replace(microsecond=micros)
            assert lines.now() == expected.isoformat().replace("+00:00", "Z")
    before = datetime.datetime.now(tz=datetime.UTC)
    stamped = datetime.datetime.fromisoformat(lines.now().replace("Z", "+00:00"))
    assert before <= stamped <= datetime.datetime.now(tz=datetime.UTC)
