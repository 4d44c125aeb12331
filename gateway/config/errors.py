"""How a configuration that cannot be used is reported: `ConfigError`, one `key.path: message`
line per problem, prefixed with the file's name."""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(Exception):
    """A configuration file that cannot be used; `errors` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {line}" for line in errors))


def format_validation_error(exc: ValidationError) -> list[str]:
    """One `key.path: message` line per pydantic error (multi-line model errors split out)."""
    lines: list[str] = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        for part in message.split("\n"):
            if ": " in part and path == "":
                lines.append(part)
            else:
                lines.append(f"{path}: {part}" if path else part)
    return lines
