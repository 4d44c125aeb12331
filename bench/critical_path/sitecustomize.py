"""Loaded at start by a gateway that bench/critical_path_bench.py runs (first on PYTHONPATH): stamps
the moments of each request's way through the gateway, in memory, and writes them at exit to
$CRITICAL_PATH_LOG as `<perf_counter_ns> <mark> <request>` lines (request: the id of its record,
0 for marks that belong to no request). It wraps functions by name and skips any a checkout lacks,
so a before/after compares the same measurement. Each mark costs about a microsecond."""

from __future__ import annotations

import atexit
import functools
import gc
import importlib
import os
import time
from array import array
from collections.abc import Callable
from typing import Any

_PATH = os.environ.get("CRITICAL_PATH_LOG")
# In columns: a tuple per mark would be an object for the garbage collector to count and scan.
_times, _keys = array("q"), array("Q")
_names: list[str] = []
_now = time.perf_counter_ns


def _mark(name: str, key: int = 0) -> None:
    _times.append(_now())
    _names.append(name)
    _keys.append(key)


def _record_of(request: Any) -> int:
    from gateway.front.access_log import RECORD

    record = request.get(RECORD) if hasattr(request, "get") else None
    return id(record) if record is not None else 0


# (module, class, function, mark at the call, mark at the return or None, how to find the request)
_KEYS: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], int]] = {
    "request": lambda args, _: _record_of(args[1]),
    "record": lambda args, kwargs: id(kwargs["record"] if "record" in kwargs else args[-1]),
    "client": lambda args, _: _record_of(args[0].request),
    "second": lambda args, _: id(args[1]),
    "none": lambda args, _: 0,
}
_WRAPPED = [
    ("aiohttp.web_protocol", "RequestHandler", "data_received", "client bytes", None, "none"),
    ("gateway.pipeline", "Pipeline", "handle", "handler", None, "request"),
    ("gateway.pipeline", "Pipeline", "admit", "reserve", "admitted", "record"),
    ("gateway.pipeline", "Pipeline", "forward_and_relay", "forward", None, "request"),
    ("gateway.pipeline", "Pipeline", "relay_answer", "upstream head", None, "request"),
    ("gateway.relay", "_Client", "write", "first bytes", None, "client"),
    ("gateway.relay", "_Client", "finish", "first bytes", None, "client"),
    ("gateway.pipeline", "Pipeline", "settle", "settle", "settled", "record"),
    ("gateway.front.access_log", None, "_finish", "access log", None, "second"),
    ("gateway.limits.batching", "EvalBatcher", "_flush", "store write", None, "none"),
    ("gateway.limits.resp", "_Protocol", "data_received", "store reply", None, "none"),
    ("gateway.upstreams.client", "Connection", "data_received", "upstream bytes", None, "none"),
]


def _wrap(function: Callable[..., Any], start: str, end: str | None, key: Callable[..., int]) -> Any:
    if end is None:

        @functools.wraps(function)
        def stamped(*args: Any, **kwargs: Any) -> Any:
            _mark(start, key(args, kwargs))
            return function(*args, **kwargs)

        return stamped

    @functools.wraps(function)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        request = key(args, kwargs)
        _mark(start, request)
        try:
            return await function(*args, **kwargs)
        finally:
            _mark(end, request)

    return timed


def _install() -> None:
    for module_name, class_name, name, start, end, how in _WRAPPED:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner = getattr(module, class_name, None) if class_name else module
        function = getattr(owner, name, None)
        if function is not None:
            setattr(owner, name, _wrap(function, start, end, _KEYS[how]))
    gc.callbacks.insert(0, lambda phase, info: _mark(f"gc {phase} {info['generation']}"))


def _write() -> None:
    with open(_PATH, "w") as out:  # type: ignore[arg-type]
        for t, name, key in zip(_times, _names, _keys, strict=True):
            out.write(f"{t} {name.replace(' ', '_')} {key}\n")


if _PATH:
    _install()
    atexit.register(_write)
