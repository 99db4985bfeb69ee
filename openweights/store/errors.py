"""Domain errors raised by the store; the server maps each to one HTTP status."""

from __future__ import annotations


class StoreError(Exception):
    """Base of store errors."""

    status_code = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotFound(StoreError):
    """The object does not exist, or belongs to another organization (which looks the same)."""

    status_code = 404
    type = "not_found"


class Conflict(StoreError):
    """The object is in a state that does not allow the operation."""

    status_code = 409
    type = "conflict"


class Fenced(Conflict):
    """A worker spoke for a run that is no longer the job's live run: it must stop the job."""

    type = "fenced"


class Invalid(StoreError):
    status_code = 400
    type = "invalid_request"


class Unauthorized(StoreError):
    status_code = 401
    type = "authentication_error"


class Forbidden(StoreError):
    status_code = 403
    type = "permission_denied"
