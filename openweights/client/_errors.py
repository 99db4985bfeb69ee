"""Client-side errors (no HTTP involved); all derive from `OpenWeightsError`."""

from __future__ import annotations

from typing import Any

from openweights._exceptions import OpenWeightsError

__all__ = ["InvalidParamsError", "WaitTimeoutError", "format_validation_error"]


class InvalidParamsError(OpenWeightsError, ValueError):
    """Job parameters did not validate; nothing was uploaded or submitted."""

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class WaitTimeoutError(OpenWeightsError, TimeoutError):
    """`wait()` gave up before the job reached the state it waited for."""

    def __init__(self, message: str, *, job: Any = None) -> None:
        super().__init__(message)
        self.job = job


def format_validation_error(what: str, exc: Any) -> InvalidParamsError:
    """`pydantic.ValidationError` → one readable line per field: `a: Field required`."""
    errors = exc.errors(include_url=False)
    lines = []
    for err in errors:
        field = ".".join(str(p) for p in err.get("loc", ())) or "(params)"
        lines.append(f"{field}: {err.get('msg')}")
    return InvalidParamsError(f"Invalid parameters for {what}: " + "; ".join(lines), errors=errors)
