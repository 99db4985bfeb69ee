"""`ow.runs` (the attempts of jobs, and their logs) and `ow.run` (the run this process is).

`ow.run` only exists inside a job: the worker sets `OPENWEIGHTS_RUN_ID` (and a run-scoped
`OPENWEIGHTS_API_KEY`). `ow.run.log({...})` posts one event at once; the job's `outputs` are
the merge of its run's event data.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from openweights._exceptions import OpenWeightsError
from openweights.client._models import Run
from openweights.client._resource import AsyncResource, SyncResource
from openweights.client.files import is_file_id
from openweights.types import EventCreate

if TYPE_CHECKING:
    from openweights.client._client import AsyncOpenWeights, OpenWeights

__all__ = ["AsyncRunLogger", "AsyncRuns", "RunLogger", "Runs", "outside_job_error"]

#: Purpose of files attached to events by local path.
EVENT_FILE_PURPOSE = "event"


def _parse_run(body: dict[str, Any]) -> Run:
    return Run.model_validate(body)


def _log_query(offset: int, follow: bool) -> dict[str, Any]:
    return {"offset": offset or None, "follow": "true" if follow else None}


def outside_job_error() -> OpenWeightsError:
    return OpenWeightsError(
        "ow.run only works inside a job: OPENWEIGHTS_RUN_ID is not set. A job's process gets it "
        "from its worker; from outside, read a job's events with ow.events.list(job_id=...)."
    )


class _EventBody(dict):
    """A built `{"data": ..., "file": ...}` request item (not event data to wrap again)."""


def _event(data: Any, file: str | None = None) -> _EventBody:
    if isinstance(data, _EventBody):
        return data
    if isinstance(data, EventCreate):
        return _EventBody(data.model_dump(mode="json", exclude_none=True))
    if not isinstance(data, dict):
        raise TypeError(f"An event is a dict, not {type(data).__name__}.")
    event = _EventBody(data=data)
    if file is not None:
        event["file"] = file
    return event


def _needs_upload(file: str | os.PathLike | None) -> bool:
    return file is not None and not is_file_id(file) and os.path.isfile(file)


class Runs(SyncResource):
    """`ow.runs`: the runs (attempts) of jobs and their logs."""

    def list(self, *, job_id: str) -> list[Run]:
        """A job's runs, oldest first (`[-1]` is the latest)."""
        body = self._http.request("GET", f"/v1/jobs/{job_id}/runs").json()
        return [_parse_run(d) for d in body.get("data") or []]

    def retrieve(self, run_id: int) -> Run:
        return _parse_run(self._http.request("GET", f"/v1/runs/{run_id}").json())

    def log_content(self, run_id: int, *, offset: int = 0) -> bytes:
        """The run's log so far (from byte `offset`)."""
        return self._http.request(
            "GET", f"/v1/runs/{run_id}/log", params=_log_query(offset, False)
        ).content

    def stream_log(self, run_id: int, *, offset: int = 0, follow: bool = True) -> Iterator[bytes]:
        """The run's log in chunks; with `follow`, live until the run ends."""
        with self._http.stream_response(
            "GET",
            f"/v1/runs/{run_id}/log",
            params=_log_query(offset, follow),
            timeout_s=float("inf") if follow else None,
        ) as response:
            yield from response.iter_bytes()


class AsyncRuns(AsyncResource):
    """`ow.runs` of `AsyncOpenWeights`."""

    async def list(self, *, job_id: str) -> list[Run]:
        """A job's runs, oldest first (`[-1]` is the latest)."""
        body = (await self._http.request("GET", f"/v1/jobs/{job_id}/runs")).json()
        return [_parse_run(d) for d in body.get("data") or []]

    async def retrieve(self, run_id: int) -> Run:
        return _parse_run((await self._http.request("GET", f"/v1/runs/{run_id}")).json())

    async def log_content(self, run_id: int, *, offset: int = 0) -> bytes:
        """The run's log so far (from byte `offset`)."""
        response = await self._http.request(
            "GET", f"/v1/runs/{run_id}/log", params=_log_query(offset, False)
        )
        return response.content

    async def stream_log(
        self, run_id: int, *, offset: int = 0, follow: bool = True
    ) -> AsyncIterator[bytes]:
        """The run's log in chunks; with `follow`, live until the run ends."""
        async with self._http.stream_response(
            "GET",
            f"/v1/runs/{run_id}/log",
            params=_log_query(offset, follow),
            timeout_s=float("inf") if follow else None,
        ) as response:
            async for chunk in response.aiter_bytes():
                yield chunk


class RunLogger:
    """`ow.run` inside a job: `ow.run.log({"loss": 0.1})`, `ow.run.id`."""

    def __init__(self, client: OpenWeights, run_id: int) -> None:
        self._client = client
        self.id = run_id
        self.job_id = client.settings.job_id

    def __repr__(self) -> str:
        return f"RunLogger(id={self.id}, job_id={self.job_id!r})"

    def log(self, data: dict[str, Any], file: str | os.PathLike | None = None) -> None:
        """Record one event now. `file`: a file id, or a local path uploaded with it."""
        if _needs_upload(file):
            file = self._client.files.upload(file, purpose=EVENT_FILE_PURPOSE).id
        self.log_many([_event(data, os.fspath(file) if file is not None else None)])

    def log_many(self, events: list[dict[str, Any]]) -> None:
        """Record many events in one request: each a data dict (or an `EventCreate`)."""
        body = [_event(e) for e in events]
        if not body:
            return
        # One lost packet must not crash a long training: resending may duplicate an event,
        # which is the lesser harm.
        self._client._http.request(
            "POST", f"/v1/runs/{self.id}/events", json={"events": body}, retry=True
        )

    def retrieve(self) -> Run:
        return self._client.runs.retrieve(self.id)


class AsyncRunLogger:
    """`ow.run` of `AsyncOpenWeights`: `await ow.run.log({...})`."""

    def __init__(self, client: AsyncOpenWeights, run_id: int) -> None:
        self._client = client
        self.id = run_id
        self.job_id = client.settings.job_id

    def __repr__(self) -> str:
        return f"AsyncRunLogger(id={self.id}, job_id={self.job_id!r})"

    async def log(self, data: dict[str, Any], file: str | os.PathLike | None = None) -> None:
        """Record one event now. `file`: a file id, or a local path uploaded with it."""
        if _needs_upload(file):
            file = (await self._client.files.upload(file, purpose=EVENT_FILE_PURPOSE)).id
        await self.log_many([_event(data, os.fspath(file) if file is not None else None)])

    async def log_many(self, events: list[dict[str, Any]]) -> None:
        """Record many events in one request: each a data dict (or an `EventCreate`)."""
        body = [_event(e) for e in events]
        if not body:
            return
        await self._client._http.request(
            "POST", f"/v1/runs/{self.id}/events", json={"events": body}, retry=True
        )

    async def retrieve(self) -> Run:
        return await self._client.runs.retrieve(self.id)
