"""Structured logging: JSON lines (or a console renderer for the demo) through structlog.

Every line of a request carries its request id and tenant through contextvars bound by the
middleware. Nothing here ever sees a prompt or a key: callers log fields, not payloads.

The standard library's loggers (aiohttp's, asyncio's, any library's) go through the same renderer,
one line per record, with what they say reduced to what cannot quote a request: the message's
template (never its arguments, which may be the bytes a client sent), the logger's name, and the
class of any exception (never its text or traceback: aiohttp's parser errors quote the raw request
line and headers, keys and prompts included).
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, BinaryIO

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog and the standard library's root logger once for the process; safe to call
    again (reload, tests)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        processors = [*shared, renderer]
        factory: Any = structlog.PrintLoggerFactory(sys.stderr)
        stream = sys.stderr
    else:
        renderer = structlog.processors.JSONRenderer(serializer=lambda v, **_: orjson.dumps(v).decode())
        json_renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        processors = [*shared, structlog.processors.format_exc_info, json_renderer]
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
        stream = sys.stdout
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,  # module-level loggers otherwise rebuild on every call
    )
    global _json_lines
    _json_lines = None
    if fmt != "console" and _LEVELS[level] <= logging.INFO:
        _json_lines = _JsonLines(processors, json_renderer, sys.stdout.buffer)
    _route_stdlib(stream, renderer, shared, _LEVELS[level])


class _JsonLines:
    """The JSON configuration's processor chain for an info line without exception, in one function."""

    def __init__(self, processors: list[Any], renderer: Any, stream: BinaryIO) -> None:
        self.processors = list(processors)  # the chain it stands for, while structlog has it configured
        self.renderer = renderer
        self.stream = stream
        self._second = -1  # the second `_prefix` is, in Unix time
        self._prefix = ""

    def write(self, event: str, fields: dict[str, Any]) -> None:
        line = fields  # as a bound logger builds it: its fields, the event, then what the chain adds
        line["event"] = event
        structlog.contextvars.merge_contextvars(None, "info", line)
        line["level"] = "info"
        line["ts"] = self.now()
        self.stream.write(self.renderer(None, "info", line) + b"\n")
        self.stream.flush()

    def now(self) -> str:
        """The time as the chain's TimeStamper(fmt="iso", utc=True) writes it (`datetime.now(UTC)
        .isoformat()`, Z for +00:00), its date and time of day formatted once a second: a
        datetime's construction and isoformat cost as much as the rest of the line."""
        seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
        if seconds != self._second:
            self._second, self._prefix = seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        return f"{self._prefix}.{micros:06d}Z" if micros else f"{self._prefix}Z"


_json_lines: _JsonLines | None = None  # set by configure_logging: the process's one configuration


def info(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """`logger.info(event, **fields)` (and `fields` is the line's: it is not to be used again).

    Under the JSON configuration it writes the same line (keys, their order, values) without
    structlog's bound logger and processor calls: a request's access-log line went through a dozen
    calls, 3% of its CPU. Under any other configuration in force (the console's, a test's
    `capture_logs`) it is `logger.info`."""
    lines = _json_lines
    # (capture_logs replaces the processors inside the configured list: compared, not identified)
    if lines is None or structlog.get_config()["processors"] != lines.processors:
        logger.info(event, **fields)
    else:
        lines.write(event, fields)


def _route_stdlib(stream: Any, renderer: Any, shared: list[Any], level: int) -> None:
    handler = _LineHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared[1:], structlog.stdlib.add_logger_name, _nothing_of_the_request],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LineHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _nothing_of_the_request(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A standard-library record, stripped of what may quote a client's bytes."""
    record: logging.LogRecord | None = event.get("_record")
    if record is not None:
        event["event"] = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
    exc_info = event.pop("exc_info", None)
    if isinstance(exc_info, tuple) and exc_info[0] is not None:
        event["error"] = exc_info[0].__name__
    event.pop("stack_info", None)
    return event


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The gateway's handler on the root logger: one record, one line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " ")


def context_var(key: str) -> contextvars.ContextVar[Any]:
    """structlog's own context variable for `key`: setting it binds `key` into every line logged in
    the context, as `bind_contextvars(key=...)` does without its lookups per call; its `reset`
    unbinds."""
    tokens = structlog.contextvars.bind_contextvars(**{key: None})
    structlog.contextvars.reset_contextvars(**tokens)
    return tokens[key].var


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
