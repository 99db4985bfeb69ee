"""Client-side views of the wire models: attribute AND item access (`f.id`, `f["id"]`).

The seed indexes results like dicts (`ow.files.upload(...)["id"]`, `job["outputs"]["file"]`),
so every object the SDK returns supports both. Unknown fields from a newer server are kept
(`extra="allow"`) instead of being dropped.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from pydantic import ConfigDict

from openweights.types import (
    FileObject,
    ModelObject,
    RunObject,
    SecretObject,
    TokenObject,
    WorkerObject,
)

__all__ = ["File", "ItemAccess", "Model", "Run", "Secret", "Token", "Worker", "format_time"]


class ItemAccess:
    """Mixin for pydantic models: `obj["field"]`, `obj.get("field")`, `"field" in obj`, `dict(obj)`."""

    def _field_names(self) -> list[str]:
        names = list(type(self).model_fields)  # type: ignore[attr-defined]
        extra = getattr(self, "__pydantic_extra__", None) or {}
        return names + [k for k in extra if k not in names]

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        return self._field_names()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._field_names()

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict of all fields."""
        return self.model_dump(mode="json")  # type: ignore[attr-defined]


class File(ItemAccess, FileObject):
    """A stored file: `file.id` or `file["id"]`."""

    model_config = ConfigDict(extra="allow")

    def __repr__(self) -> str:
        return (
            f"File(id={self.id!r}, filename={self.filename!r}, purpose={self.purpose!r}, "
            f"bytes={self.bytes})"
        )


class Run(ItemAccess, RunObject):
    """One attempt of a job on one worker: `run.id`, `run.status`, `run.log_file`, `run.attempt`."""

    model_config = ConfigDict(extra="allow")

    def __repr__(self) -> str:
        return (
            f"Run(id={self.id}, job_id={self.job_id!r}, attempt={self.attempt}, "
            f"status={self.status!r}, log_file={self.log_file!r})"
        )


class Model(ItemAccess, ModelObject):
    """A registered model: `model.id` (its name), `model.kind`, `model.base_model`, `model.checkpoints`."""

    model_config = ConfigDict(extra="allow")

    def __repr__(self) -> str:
        return (
            f"Model(id={self.id!r}, kind={self.kind!r}, base_model={self.base_model!r}, "
            f"job_id={self.job_id!r}, checkpoints={len(self.checkpoints)})"
        )


class Token(ItemAccess, TokenObject):
    """An API token; `token.token` (the secret) is set only right after `create()`."""

    model_config = ConfigDict(extra="allow")


class Secret(ItemAccess, SecretObject):
    """An organization secret: its name only, never its value."""

    model_config = ConfigDict(extra="allow")


class Worker(ItemAccess, WorkerObject):
    """A worker process that claims and runs jobs."""

    model_config = ConfigDict(extra="allow")


def format_time(ts: float | None) -> str:
    """Epoch seconds → local `YYYY-MM-DD HH:MM:SS` (or `-`)."""
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
