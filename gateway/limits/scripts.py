"""The Lua scripts, one file per store operation, read with importlib.resources.

Each is registered once (SCRIPT LOAD at start, on every primary of a cluster) and then only run
by its SHA-1. A server that has forgotten it (restarted, failed over, SCRIPT FLUSH) answers
NOSCRIPT, and the call is run again by the script's source (EVAL), which registers it again, so
recovery needs nobody (batching.py: in the order the calls were made).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: bytes
    sha: str


def load(name: str) -> Script:
    source = resources.files("gateway.limits").joinpath("lua", f"{name}.lua").read_bytes()
    return Script(name, source, hashlib.sha1(source).hexdigest())


RESERVE = load("reserve")
SETTLE = load("settle")
RENEW = load("renew")
ALL = (RESERVE, SETTLE, RENEW)
