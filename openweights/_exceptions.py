"""Exceptions raised by openweights.

OpenWeightsError
 ├── APIError
 │    ├── APIConnectionError          the server could not be reached
 │    │    └── APITimeoutError        it did not answer in time
 │    └── APIStatusError              it answered with an error status (status_code, request_id, body)
 │         ├── BadRequestError            400
 │         ├── AuthenticationError        401
 │         ├── PermissionDeniedError      403
 │         ├── NotFoundError              404
 │         ├── ConflictError              409
 │         ├── PayloadTooLargeError       413
 │         ├── UnprocessableEntityError   422
 │         ├── RateLimitError             429
 │         └── InternalServerError        5xx
 ├── JobFailedError                   a job the client waited for failed or was canceled
 └── ServiceError                     the embedded service could not be started or reached
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InternalServerError",
    "JobFailedError",
    "NotFoundError",
    "OpenWeightsError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceError",
    "UnprocessableEntityError",
    "make_status_error",
]


class OpenWeightsError(Exception):
    """Base class of every error openweights raises."""


class APIError(OpenWeightsError):
    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(APIError):
    def __init__(
        self, message: str = "Could not connect to the openweights server.", *, request=None
    ):
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    def __init__(
        self, message: str = "The openweights server did not answer in time.", *, request=None
    ):
        super().__init__(message, request=request)


class APIStatusError(APIError):
    """The server answered with a 4xx or 5xx status."""

    def __init__(self, message: str, *, response: httpx.Response, body: Any) -> None:
        super().__init__(message, request=response.request)
        self.response = response
        self.status_code = response.status_code
        self.request_id = response.headers.get("x-request-id")
        self.body = body
        err = body.get("error") if isinstance(body, dict) else None
        self.type: str | None = err.get("type") if isinstance(err, dict) else None
        self.param: str | None = err.get("param") if isinstance(err, dict) else None


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class ConflictError(APIStatusError):
    pass


class PayloadTooLargeError(APIStatusError):
    pass


class UnprocessableEntityError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class JobFailedError(OpenWeightsError):
    """A job that the client waited for ended as failed or canceled."""

    def __init__(self, message: str, *, job: Any = None) -> None:
        super().__init__(message)
        self.job = job


class ServiceError(OpenWeightsError):
    """The embedded openweights service could not be started or reached."""


_STATUS_TO_ERROR: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def make_status_error(response: httpx.Response) -> APIStatusError:
    """Map an error response to its exception class, with the server's message."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    message = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    if not message:
        message = f"{response.status_code} {response.reason_phrase}: {str(body)[:500]}"
    message = f"{message} ({response.request.method} {response.request.url.path} → {response.status_code})"
    cls = _STATUS_TO_ERROR.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    return cls(message, response=response, body=body)
