"""`ow.workers`: the organization's workers (what hardware is there, what it runs)."""

from __future__ import annotations

from typing import Any

from openweights.client._models import Worker
from openweights.client._resource import AsyncResource, SyncResource

__all__ = ["AsyncWorkers", "Workers"]


def _parse_page(body: dict[str, Any]) -> list[Worker]:
    return [Worker.model_validate(d) for d in body.get("data") or []]


class Workers(SyncResource):
    """`ow.workers`."""

    def list(self) -> list[Worker]:
        return _parse_page(self._http.request("GET", "/v1/workers").json())


class AsyncWorkers(AsyncResource):
    """`ow.workers` of `AsyncOpenWeights`."""

    async def list(self) -> list[Worker]:
        return _parse_page((await self._http.request("GET", "/v1/workers")).json())
