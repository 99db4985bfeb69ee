"""Helpers shared by the `ow` commands. Imports nothing heavy: `ow --help` must stay instant."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openweights.client import OpenWeights

__all__ = [
    "CLIError",
    "format_table",
    "is_user_error",
    "load_env_file",
    "make_client",
    "parse_dotenv",
    "stdin_is_tty",
    "stdout_is_tty",
]


class CLIError(Exception):
    """A user error: `ow` prints its message (no traceback) and exits 1."""


def is_user_error(exc: BaseException) -> bool:
    """`CLIError` or any `OpenWeightsError` (checked without importing openweights' errors)."""
    if isinstance(exc, CLIError):
        return True
    errors = sys.modules.get("openweights._exceptions")
    return errors is not None and isinstance(exc, errors.OpenWeightsError)


def make_client() -> OpenWeights:
    """The client commands use (tests replace this function)."""
    from openweights.client import OpenWeights

    return OpenWeights()


def stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def stdin_is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A left-aligned text table with a header row."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), value)


def parse_dotenv(text: str, *, source: str = ".env") -> dict[str, str]:
    """`KEY=VALUE` lines: `#` comments, `export KEY=…`, single/double quotes (multi-line too)."""
    out: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        lineno, line = i + 1, lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise CLIError(f"{source}:{lineno}: expected KEY=VALUE, got {lines[lineno - 1]!r}")
        value = value.strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            body = value[1:]
            # a quoted value may span lines until its closing quote
            while _closing_quote(body, quote) < 0 and i < len(lines):
                body += "\n" + lines[i]
                i += 1
            end = _closing_quote(body, quote)
            if end < 0:
                raise CLIError(f"{source}:{lineno}: unterminated {quote} quote for {key}")
            value = body[:end]
            if quote == '"':
                value = _unescape(value)
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        out[key] = value
    return out


def _closing_quote(body: str, quote: str) -> int:
    j = 0
    while j < len(body):
        if body[j] == "\\" and quote == '"':
            j += 2
            continue
        if body[j] == quote:
            return j
        j += 1
    return -1


def read_env_file(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CLIError(f"Cannot read env file {path!r}: {e.strerror or e}") from None
    return parse_dotenv(text, source=path)


def load_env_file(path: str) -> dict[str, str]:
    """Put the file's variables into this process's environment (they win over existing ones)."""
    values = read_env_file(path)
    os.environ.update(values)
    return values
