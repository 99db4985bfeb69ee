"""openweights: an OpenAI-like SDK, server and workers for jobs on open-weight LLMs.

```python
from openweights import OpenWeights

ow = OpenWeights()
file_id = ow.files.upload("train.jsonl", purpose="conversations")["id"]
```

Names are imported on first use, so `import openweights` (and `ow --help`) stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → module that defines it
_LAZY: dict[str, str] = {
    "OpenWeights": "openweights.client",
    "AsyncOpenWeights": "openweights.client",
    "Jobs": "openweights.client",
    "register": "openweights.client",
    "signup": "openweights.client",
    "Job": "openweights.client",
    "AsyncJob": "openweights.client",
    "File": "openweights.client",
    "Run": "openweights.client",
    "InvalidParamsError": "openweights.client",
    "WaitTimeoutError": "openweights.client",
    "Settings": "openweights._settings",
    "OpenWeightsError": "openweights._exceptions",
    "APIError": "openweights._exceptions",
    "APIConnectionError": "openweights._exceptions",
    "APITimeoutError": "openweights._exceptions",
    "APIStatusError": "openweights._exceptions",
    "BadRequestError": "openweights._exceptions",
    "AuthenticationError": "openweights._exceptions",
    "PermissionDeniedError": "openweights._exceptions",
    "NotFoundError": "openweights._exceptions",
    "ConflictError": "openweights._exceptions",
    "PayloadTooLargeError": "openweights._exceptions",
    "UnprocessableEntityError": "openweights._exceptions",
    "RateLimitError": "openweights._exceptions",
    "InternalServerError": "openweights._exceptions",
    "JobFailedError": "openweights._exceptions",
    "ServiceError": "openweights._exceptions",
}

__all__ = [
    "__version__",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncJob",
    "AsyncOpenWeights",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "File",
    "InternalServerError",
    "InvalidParamsError",
    "Job",
    "JobFailedError",
    "Jobs",
    "NotFoundError",
    "OpenWeights",
    "OpenWeightsError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "Run",
    "ServiceError",
    "Settings",
    "UnprocessableEntityError",
    "WaitTimeoutError",
    "register",
    "signup",
]

if TYPE_CHECKING:
    from openweights._exceptions import (
        APIConnectionError,
        APIError,
        APIStatusError,
        APITimeoutError,
        AuthenticationError,
        BadRequestError,
        ConflictError,
        InternalServerError,
        JobFailedError,
        NotFoundError,
        OpenWeightsError,
        PayloadTooLargeError,
        PermissionDeniedError,
        RateLimitError,
        ServiceError,
        UnprocessableEntityError,
    )
    from openweights._settings import Settings
    from openweights.client import (
        AsyncJob,
        AsyncOpenWeights,
        File,
        InvalidParamsError,
        Job,
        Jobs,
        OpenWeights,
        Run,
        WaitTimeoutError,
        register,
        signup,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'openweights' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
