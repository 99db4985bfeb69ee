"""Error answers every route may give, documented once for the OpenAPI schema."""

from __future__ import annotations

from openweights.types import ErrorResponse

_ERRORS = {
    400: "The request is invalid (the message names what and where).",
    401: "Missing, unknown, revoked or expired API key.",
    403: "This kind of token may not do this.",
    404: "No such object in your organization.",
    409: "The object's state does not allow this (or a worker's run was fenced).",
    413: "The request body is too large.",
    422: "The request does not match the schema (the message names the field).",
}
ERROR_RESPONSES: dict[int | str, dict] = {
    code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()
}
