"""`ow.events`: what runs recorded (`ow.run.log`), metrics, result files; oldest first."""

from __future__ import annotations

from typing import Any

from openweights._exceptions import OpenWeightsError
from openweights.client._resource import AsyncResource, SyncResource

__all__ = ["AsyncEvents", "Events"]

#: The server returns at most this many events per page.
PAGE_MAX = 10_000


def _event_query(job_id: str | None, run_id: int | None) -> dict[str, Any]:
    if job_id is None and run_id is None:
        raise OpenWeightsError("ow.events.list() needs job_id= or run_id=.")
    return {"job_id": job_id, "run_id": run_id}


def _as_dict(body: dict[str, Any]) -> dict[str, Any]:
    return body


class Events(SyncResource):
    """`ow.events`."""

    def list(self, *, job_id: str | None = None, run_id: int | None = None) -> list[dict[str, Any]]:
        """All events of a job or a run, oldest first; each a dict with `data`, `file`, `run_id`…"""
        return self._list(
            "/v1/events",
            params=_event_query(job_id, run_id),
            limit=None,
            page_max=PAGE_MAX,
            parse=_as_dict,
        )


class AsyncEvents(AsyncResource):
    """`ow.events` of `AsyncOpenWeights`."""

    async def list(
        self, *, job_id: str | None = None, run_id: int | None = None
    ) -> list[dict[str, Any]]:
        """All events of a job or a run, oldest first; each a dict with `data`, `file`, `run_id`…"""
        return await self._list(
            "/v1/events",
            params=_event_query(job_id, run_id),
            limit=None,
            page_max=PAGE_MAX,
            parse=_as_dict,
        )
