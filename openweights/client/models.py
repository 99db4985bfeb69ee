"""`ow.models`: the models this organization's jobs produced, by name (`finetuned_model_id`).

Any job's `model=` takes these names (and `name/checkpoint-N` for a checkpoint); workers fetch
the files from openweights' own storage, so no external hub is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from openweights.client._models import Model
from openweights.client._resource import AsyncResource, SyncResource

__all__ = ["AsyncModels", "Models"]


def _path(name: str) -> str:
    return "/v1/models/" + quote(name.strip("/"), safe="/")


def _parse_list(body: dict[str, Any]) -> list[Model]:
    return [Model.model_validate(d) for d in body.get("data") or []]


def _selected(model: Model, subfolder: str | None) -> dict[str, str]:
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    out = {
        rel[len(prefix) :]: fid
        for rel, fid in model.files.items()
        if rel.startswith(prefix) and (subfolder or not rel.startswith("checkpoint-"))
    }
    if not out:
        raise ValueError(f"model {model.id!r} has no files under {subfolder!r}")
    return out


class Models(SyncResource):
    """`ow.models`."""

    def list(self, *, base_model: str | None = None, limit: int = 100) -> list[Model]:
        params: dict[str, Any] = {"limit": limit}
        if base_model:
            params["base_model"] = base_model
        return _parse_list(self._http.request("GET", "/v1/models", params=params).json())

    def retrieve(self, name: str) -> Model:
        return Model.model_validate(self._http.request("GET", _path(name)).json())

    def delete(self, name: str) -> Model:
        """Forget the name; the files stay with the job that made them."""
        return Model.model_validate(self._http.request("DELETE", _path(name)).json())

    def download(self, name: str, dir: str | os.PathLike, *, subfolder: str | None = None) -> Path:
        """The model's files (or one checkpoint's: `subfolder="checkpoint-10"`) under `dir`,
        ready for `from_pretrained(dir)`."""
        root = Path(dir)
        for rel, fid in _selected(self.retrieve(name), subfolder).items():
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._client.files.download(fid, dest)
        return root


class AsyncModels(AsyncResource):
    """`ow.models` of `AsyncOpenWeights`."""

    async def list(self, *, base_model: str | None = None, limit: int = 100) -> list[Model]:
        params: dict[str, Any] = {"limit": limit}
        if base_model:
            params["base_model"] = base_model
        return _parse_list((await self._http.request("GET", "/v1/models", params=params)).json())

    async def retrieve(self, name: str) -> Model:
        return Model.model_validate((await self._http.request("GET", _path(name))).json())

    async def delete(self, name: str) -> Model:
        return Model.model_validate((await self._http.request("DELETE", _path(name))).json())

    async def download(
        self, name: str, dir: str | os.PathLike, *, subfolder: str | None = None
    ) -> Path:
        root = Path(dir)
        for rel, fid in _selected(await self.retrieve(name), subfolder).items():
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            await self._client.files.download(fid, dest)
        return root
