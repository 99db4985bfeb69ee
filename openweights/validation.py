"""Row-by-row validation of uploaded JSONL files, for the purposes whose format we know.

The server runs this on every upload of a `conversations`, `weighted_conversations` or
`preference` file, so that a bad row is refused with its line and field at the edge instead
of failing a job hours later on a GPU. Other purposes are stored as they are.

Files are streamed (constant memory; files of 1 GiB+ are normal) and the first bad row
raises `FileValidationError`:

    train.jsonl line 3, field messages[1].role: must be one of system, user, assistant, tool (got 'bot')

Formats (see the README's "Data formats"):

- conversations: `{"messages": [message, ...]}` or `{"text": "..."}`
- weighted_conversations: `{"messages": [message, ...]}`
- preference: `{"prompt": [message, ...], "chosen": [...], "rejected": [...]}`

where a message is `{"role": "system"|"user"|"assistant"|"tool", "content": str | [block, ...]}`
and a block is `{"type": "text", "text": str, "weight": number?, "tag": str?, ...}`.
Other keys (of rows, messages and blocks) are allowed and kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, BinaryIO

from openweights._exceptions import OpenWeightsError
from openweights.types.files import VALIDATED_PURPOSES

__all__ = [
    "MAX_LINE_BYTES",
    "TRAINING_USES",
    "FileValidationError",
    "JsonlValidator",
    "validate_bytes",
    "validate_fileobj",
    "validate_jsonl",
    "training_row_problem",
    "validate_training_lines",
]

#: The longest row accepted, in bytes. Bounds memory: one row is held at a time.
MAX_LINE_BYTES = 64 << 20

_READ_SIZE = 1 << 20
_ROLES = ("system", "user", "assistant", "tool")
_ROLE_SET = frozenset(_ROLES)
_MISSING: Any = object()


class FileValidationError(OpenWeightsError, ValueError):
    """A file's content does not match the format its purpose requires."""

    def __init__(self, filename: str, line: int | None, field: str | None, message: str) -> None:
        super().__init__(filename, line, field, message)
        self.filename = filename
        #: 1-based line number; None for errors about the whole file (e.g. it is empty).
        self.line = line
        #: Path of the bad value inside the row (`messages[1].content[0].weight`); None when
        #: the line itself is bad (not UTF-8, not JSON, not an object).
        self.field = field
        self.message = message

    def __str__(self) -> str:
        where = self.filename
        if self.line is not None:
            where += f" line {self.line}"
        if self.field is not None:
            where += f", field {self.field}"
        return f"{where}: {self.message}"


class _Invalid(Exception):
    """A row is invalid: `field` (a path inside the row) and what is wrong with it."""

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message


class _NonFiniteNumber(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFiniteNumber(name)


# One decoder, built once: `json.loads(s, **kwargs)` would build a new one per call.
# NaN/Infinity are not JSON (RFC 8259); other readers (pyarrow, jq, PostgreSQL) refuse them.
_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


def _show(value: Any) -> str:
    """A short JSON-ish rendering of a value for error messages."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "…")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - json yields nothing else


# ---------------------------------------------------------------------------------------------
# Row checks. The happy path does no string formatting: field paths are built only on error.


def _check_block(block: Any, where: str) -> None:
    if type(block) is not dict:
        raise _Invalid(
            where, f'must be an object like {{"type": "text", "text": "..."}} (got {_show(block)})'
        )
    kind = block.get("type", "text")
    if kind != "text":
        if type(kind) is str:
            raise _Invalid(
                f"{where}.type",
                f"unsupported block type {_show(kind)}; only 'text' blocks are supported",
            )
        raise _Invalid(f"{where}.type", f"must be 'text' (got {_show(kind)})")
    text = block.get("text", _MISSING)
    if type(text) is not str:
        if text is _MISSING:
            raise _Invalid(f"{where}.text", "required: a block needs its text")
        raise _Invalid(f"{where}.text", f"must be a string (got {_show(text)})")
    weight = block.get("weight", _MISSING)
    if weight is not _MISSING:
        kind = type(weight)
        if kind is float:
            if not math.isfinite(weight):
                raise _Invalid(f"{where}.weight", f"must be a finite number (got {weight!r})")
        elif kind is not int:  # bool is not int here: type(True) is bool
            raise _Invalid(f"{where}.weight", f"must be a number (got {_show(weight)})")
    tag = block.get("tag", _MISSING)
    if tag is not _MISSING and type(tag) is not str:
        raise _Invalid(f"{where}.tag", f"must be a string (got {_show(tag)})")


def _check_messages(messages: Any, key: str) -> None:
    if type(messages) is not list:
        raise _Invalid(key, f"must be a list of messages (got {_show(messages)})")
    if not messages:
        raise _Invalid(key, "must not be empty")
    roles = _ROLE_SET
    isfinite = math.isfinite
    for i, message in enumerate(messages):
        if type(message) is not dict:
            raise _Invalid(
                f"{key}[{i}]",
                f'must be an object like {{"role": "user", "content": "..."}} (got {_show(message)})',
            )
        role = message.get("role", _MISSING)
        if type(role) is not str or role not in roles:
            if role is _MISSING:
                raise _Invalid(f"{key}[{i}].role", "required: a message needs a role")
            raise _Invalid(
                f"{key}[{i}].role", f"must be one of {', '.join(_ROLES)} (got {_show(role)})"
            )
        content = message.get("content", _MISSING)
        if type(content) is str:
            continue
        if type(content) is list:
            for j, block in enumerate(content):
                # Inline fast path for a well-formed block; _check_block finds what is wrong.
                if type(block) is dict and type(block.get("text")) is str:
                    weight = block.get("weight", 0)
                    if (
                        block.get("type", "text") == "text"
                        and (type(weight) is int or (type(weight) is float and isfinite(weight)))
                        and type(block.get("tag", "")) is str
                    ):
                        continue
                _check_block(block, f"{key}[{i}].content[{j}]")
            continue
        if content is _MISSING:
            raise _Invalid(f"{key}[{i}].content", "required: a message needs content")
        raise _Invalid(
            f"{key}[{i}].content", f"must be a string or a list of blocks (got {_show(content)})"
        )


def _check_conversation(row: dict) -> None:
    messages = row.get("messages", _MISSING)
    if messages is not _MISSING:
        _check_messages(messages, "messages")
        return
    text = row.get("text", _MISSING)
    if text is _MISSING:
        raise _Invalid(
            "messages",
            'required: a conversations row needs "messages" (a list of messages) or "text" (a string)',
        )
    if type(text) is not str:
        raise _Invalid("text", f"must be a string (got {_show(text)})")


def _check_weighted_conversation(row: dict) -> None:
    messages = row.get("messages", _MISSING)
    if messages is _MISSING:
        raise _Invalid(
            "messages",
            'required: a weighted_conversations row needs "messages" (a list of messages)',
        )
    _check_messages(messages, "messages")


def _check_preference(row: dict) -> None:
    for key in ("prompt", "chosen", "rejected"):
        value = row.get(key, _MISSING)
        if value is _MISSING:
            raise _Invalid(
                key,
                'required: a preference row needs "prompt", "chosen" and "rejected", '
                "each a list of messages",
            )
        _check_messages(value, key)


_ROW_CHECKS = {
    "conversations": _check_conversation,
    "weighted_conversations": _check_weighted_conversation,
    "preference": _check_preference,
}
assert set(_ROW_CHECKS) == set(VALIDATED_PURPOSES)


# ---------------------------------------------------------------------------------------------
# Streaming


class JsonlValidator:
    """Incremental validator: `feed()` chunks as they arrive, then `close()` for the row count.

    Lets the server validate an upload in the same pass that hashes and stores it. Holds at
    most one row (plus the current chunk) in memory. For purposes that are not validated,
    `feed()` does nothing and `close()` returns 0.
    """

    def __init__(
        self, purpose: str, *, filename: str, max_line_bytes: int = MAX_LINE_BYTES
    ) -> None:
        self.purpose = purpose
        self.filename = filename
        self.max_line_bytes = max_line_bytes
        #: Valid rows seen so far (blank lines are not rows).
        self.rows = 0
        self._check = _ROW_CHECKS.get(purpose)
        self._lines = 0  # lines fully processed
        self._pending: list[bytes] = []  # the start of a line whose end has not arrived yet
        self._pending_len = 0
        self._error: FileValidationError | None = None
        self._closed = False

    @property
    def validates(self) -> bool:
        """Whether this purpose's content is checked at all."""
        return self._check is not None

    def feed(self, data: bytes) -> None:
        """Validate the complete lines in `data` (and in what earlier calls left over)."""
        if self._check is None or not data:
            return
        if self._error is not None:
            raise self._error
        if self._closed:
            raise RuntimeError("JsonlValidator.feed() after close()")
        end = data.rfind(b"\n")
        if end < 0:
            self._pending.append(data)
            self._pending_len += len(data)
            if self._pending_len > self.max_line_bytes:
                raise self._error_at(self._lines + 1, None, self._too_long())
            return
        if self._pending:
            if self._pending_len + end > self.max_line_bytes:
                raise self._error_at(self._lines + 1, None, self._too_long())
            self._pending.append(data[:end])
            complete = b"".join(self._pending)
        else:
            complete = data[:end]
        rest = data[end + 1 :]
        self._pending = [rest] if rest else []
        self._pending_len = len(rest)
        self._process(complete)

    def close(self) -> int:
        """Validate the last line (which may lack a newline) and return the number of rows."""
        if self._check is None:
            return 0
        if self._error is not None:
            raise self._error
        if not self._closed:
            self._closed = True
            if self._pending:
                last = b"".join(self._pending)
                self._pending = []
                self._pending_len = 0
                self._process(last)
            if self.rows == 0:
                raise self._error_at(
                    None,
                    None,
                    f"the file has no rows; a {self.purpose} file needs one JSON object per line",
                )
        return self.rows

    def _too_long(self) -> str:
        return f"the line is longer than {self.max_line_bytes} bytes, the most one row may have"

    def _error_at(self, line: int | None, field: str | None, message: str) -> FileValidationError:
        # Kept: a later feed()/close() raises the same error again.
        self._error = FileValidationError(self.filename, line, field, message)
        return self._error

    def _process(self, complete: bytes) -> None:
        """Validate `complete`: one or more whole lines joined by b"\\n", without the last one."""
        first = self._lines + 1
        try:
            # Decoding whole chunks is much faster than line by line, and safe: b"\n" never
            # occurs inside a multi-byte UTF-8 sequence, so a chunk cut at b"\n" is whole.
            text = complete.decode("utf-8")
        except UnicodeDecodeError as e:
            line = first + complete.count(b"\n", 0, e.start)
            column = e.start - (complete.rfind(b"\n", 0, e.start) + 1) + 1
            raise self._error_at(
                line,
                None,
                f"invalid UTF-8 (byte 0x{complete[e.start]:02x} at byte {column} of the line); "
                "save the file as UTF-8",
            ) from None
        lines = text.split("\n")
        if first == 1 and text.startswith("\ufeff"):
            raise self._error_at(
                1,
                None,
                "the file starts with a byte order mark (BOM); save it as UTF-8 without BOM",
            )
        if len(complete) > self.max_line_bytes:
            for offset, line_text in enumerate(lines):
                if len(line_text) > self.max_line_bytes or (
                    len(line_text) * 4 > self.max_line_bytes
                    and len(line_text.encode("utf-8")) > self.max_line_bytes
                ):
                    raise self._error_at(first + offset, None, self._too_long())

        check = self._check
        assert check is not None
        decode = _decode
        line = first - 1
        rows = 0
        try:
            for line_text in lines:
                line += 1
                try:
                    row = decode(line_text)
                except _NonFiniteNumber as e:
                    raise self._error_at(
                        line,
                        None,
                        f"invalid JSON: {e} is not a JSON number; use null or a finite number",
                    ) from None
                except json.JSONDecodeError as e:
                    if not line_text or line_text.isspace():
                        continue  # blank lines are skipped
                    raise self._error_at(line, None, _json_error_message(e, line_text)) from None
                if type(row) is not dict:
                    raise self._error_at(
                        line, None, f"each line must be a JSON object (got {_show(row)})"
                    )
                try:
                    check(row)
                except _Invalid as e:
                    raise self._error_at(line, e.field, e.message) from None
                rows += 1
        finally:
            self.rows += rows
            self._lines = line


def _json_error_message(e: json.JSONDecodeError, line_text: str) -> str:
    if e.msg == "Extra data":
        return f"invalid JSON: more after the end of the value at column {e.colno} (one JSON object per line)"
    if e.msg.startswith("Unterminated string"):
        return (
            f"invalid JSON: the line ends inside a string that starts at column {e.colno}; "
            "is the row cut off?"
        )
    if e.pos >= len(line_text.rstrip()):
        return f"invalid JSON: the line ends before the value does ({e.msg}); is the row cut off?"
    return f"invalid JSON: {e.msg} at column {e.colno}"


def validate_fileobj(fileobj: BinaryIO, purpose: str, *, filename: str) -> int:
    """Validate a binary file object read to its end; returns the number of rows.

    Returns 0 without reading for purposes that are not validated.
    """
    validator = JsonlValidator(purpose, filename=filename)
    if not validator.validates:
        return 0
    read = fileobj.read
    while chunk := read(_READ_SIZE):
        validator.feed(chunk)
    return validator.close()


def validate_jsonl(path: str | Path, purpose: str, *, filename: str) -> int:
    """Validate the JSONL file at `path` for `purpose`; returns the number of rows.

    Raises `FileValidationError` naming `filename`, the line and the field of the first bad
    row. Purposes that are not validated return 0 without opening the file.
    """
    if purpose not in _ROW_CHECKS:
        return 0
    with open(path, "rb") as f:
        return validate_fileobj(f, purpose, filename=filename)


def validate_bytes(data: bytes, purpose: str, *, filename: str) -> int:
    """`validate_jsonl` for content already in memory."""
    validator = JsonlValidator(purpose, filename=filename)
    validator.feed(data)
    return validator.close()


# ---------------------------------------------------------------------------------------------
# Fitness for training: what a file that passed its purpose's checks must also have for a use.

#: Uses a training job puts a file to, and what each needs of a row.
TRAINING_USES = ("sft", "weighted_sft", "preference")


def _effective_weights(messages: list, responses_only: bool) -> list[float]:
    out = []
    for m in messages:
        default = 1.0 if m.get("role") == "assistant" or not responses_only else 0.0
        content = m.get("content")
        if isinstance(content, list):
            out += [float(b.get("weight", default)) for b in content if isinstance(b, dict)]
        else:
            out.append(default)
    return out


def training_row_problem(
    row: dict, use: str, *, responses_only: bool = True
) -> tuple[str, str] | None:
    """(field, message) when a row that is valid for its purpose cannot be trained on for
    `use`, else None."""
    if use == "preference":
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                return key, f'required: a preference row needs "{key}"'
        for key in ("chosen", "rejected"):
            if not any(m.get("role") == "assistant" for m in row[key]):
                return key, "needs an assistant message: the response to prefer or reject"
        return None
    messages = row.get("messages")
    if messages is None:
        if use == "sft" and isinstance(row.get("text"), str):
            return None
        return "messages", "required: a list of messages"
    if use == "sft":
        if responses_only and not any(m.get("role") == "assistant" for m in messages):
            return (
                "messages",
                "no assistant message to train on (train_on_responses_only trains only on "
                "assistant turns)",
            )
        return None
    if use == "weighted_sft":
        if not any(w != 0 for w in _effective_weights(messages, responses_only)):
            return (
                "messages",
                "nothing to train on: every block has weight 0 (and no assistant message has "
                "string content, which weighs 1)",
            )
        return None
    raise ValueError(f"unknown training use {use!r}; one of {', '.join(TRAINING_USES)}")


def validate_training_lines(
    lines: Any, use: str, *, filename: str, responses_only: bool = True
) -> int:
    """Check rows (an iterable of JSON lines, str or bytes) for a training `use`; raises
    `FileValidationError` with file, line and field for the first row that cannot be trained
    on. Returns the number of rows."""
    rows = 0
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileValidationError(filename, number, None, f"invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise FileValidationError(filename, number, None, "each line must be a JSON object")
        problem = training_row_problem(row, use, responses_only=responses_only)
        if problem is not None:
            raise FileValidationError(filename, number, problem[0], problem[1])
        rows += 1
    if rows == 0:
        raise FileValidationError(filename, None, None, "the file has no rows to train on")
    return rows


def iter_lines(chunks: Any) -> Any:
    """Lines (bytes, without the newline) of a stream of byte chunks."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending
