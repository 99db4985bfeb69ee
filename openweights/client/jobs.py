"""`ow.jobs` and the `Job` object.

A `Job` is the server's `JobObject` with attribute AND item access (`job.status`,
`job["outputs"]["file"]`) plus methods bound to the client that fetched it: `refresh()`,
`runs`, `cancel()`, `restart()`, `wait()`, `download()`. `AsyncJob` is its awaitable twin.

`wait()` is event driven: it long-polls `GET /v1/jobs/{id}/wait`, which answers as soon as the
job reaches the state waited for, so there is no sleep loop.
"""

from __future__ import annotations

import builtins
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, PrivateAttr, ValidationError

from openweights._exceptions import APIError, JobFailedError, NotFoundError, OpenWeightsError
from openweights.client._errors import WaitTimeoutError, format_validation_error
from openweights.client._models import ItemAccess, Run, format_time
from openweights.client._progress import JobStatusLine, describe_progress
from openweights.client._resource import AsyncResource, SyncResource
from openweights.client.files import is_file_id
from openweights.types import TERMINAL_STATUSES, JobCreateParams, JobObject

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncJob", "AsyncJobsResource", "Job", "JobsResource", "PreparedJob"]

#: Seconds one long-poll may last (the server caps it at 60).
WAIT_POLL_S = 30
#: On a terminal the status line (with the latest progress event) refreshes this often.
WAIT_POLL_TTY_S = 2
#: Extra read time beyond the long-poll itself before the request counts as hung.
_WAIT_GRACE_S = 30.0
Until = Literal["terminal", "started"]


# ---------------------------------------------------------------- Job objects


class _JobBase(ItemAccess, JobObject):
    model_config = ConfigDict(extra="allow")
    _client: Any = PrivateAttr(default=None)

    def _bound(self) -> Any:
        if self._client is None:
            raise OpenWeightsError(
                f"Job {self.id!r} is not bound to a client; get it from ow.jobs.retrieve()."
            )
        return self._client

    def _replace_with(self, other: JobObject) -> Self:
        """Take every field of `other` (a fresher copy of this job) in place."""
        self.__dict__.update(other.__dict__)
        object.__setattr__(self, "__pydantic_extra__", dict(other.__pydantic_extra__ or {}))
        object.__setattr__(self, "__pydantic_fields_set__", set(other.__pydantic_fields_set__))
        return self

    @property
    def done(self) -> bool:
        """True once the job is completed, failed or canceled."""
        return self.status in TERMINAL_STATUSES

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, type={self.type!r}, status={self.status!r}, "
            f"model={self.model!r}, created_at={format_time(self.created_at)!r})"
        )

    def __str__(self) -> str:
        lines = [f"Job {self.id}"]
        status = self.status
        if self.attempts:
            status += f"   (attempt {self.attempts} of {self.max_attempts})"
        rows: list[tuple[str, Any]] = [
            ("type", self.type),
            ("status", status),
            ("pending", self.pending_reason if self.status == "pending" else None),
            ("error", self.error),
            ("model", self.model),
            ("created", format_time(self.created_at)),
            ("finished", format_time(self.finished_at) if self.finished_at else None),
            ("outputs", _short_json(self.outputs) if self.outputs else None),
            ("params", _short_json(self.params, 400)),
            ("script", _short(self.script, 200)),
        ]
        lines += [f"  {k + ':':<9} {v}" for k, v in rows if v not in (None, "")]
        return "\n".join(lines)


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _short_json(value: Any, n: int = 200) -> str:
    return _short(json.dumps(value, default=str), n)


class Job(_JobBase):
    """A job: `job.status`, `job["outputs"]`, `job.refresh()`, `job.runs`, `job.wait()` …"""

    def refresh(self) -> Job:
        """Fetch the job again; updates this object in place and returns it."""
        return self._replace_with(self._bound().jobs.retrieve(self.id))

    @property
    def runs(self) -> list[Run]:
        """The job's runs (attempts), oldest first: `job.runs[-1]` is the latest."""
        return self._bound().runs.list(job_id=self.id)

    def cancel(self) -> Job:
        return self._replace_with(self._bound().jobs.cancel(self.id))

    def restart(self) -> Job:
        """Put a failed or canceled job back to pending (attempts reset)."""
        return self._replace_with(self._bound().jobs.restart(self.id))

    def wait(
        self,
        *,
        timeout_s: float | None = None,
        raise_on_failure: bool = False,
        timeout: float | None = None,
    ) -> Job:
        """Block until the job is completed, failed or canceled; returns this job, refreshed.

        `timeout` is an alias of `timeout_s`. `raise_on_failure`: raise `JobFailedError` when
        the job failed or was canceled.
        """
        fresh = self._bound().jobs.wait(
            self.id, timeout_s=timeout_s, raise_on_failure=False, timeout=timeout
        )
        self._replace_with(fresh)
        _raise_if_failed(self, raise_on_failure)
        return self

    def download(self, dir: str | Path, *, only_last_run: bool = True) -> list[Path]:
        """Download logs and result files; returns the paths written.

        Logs go to `dir/logs/<run_id>.log`; each file a run reported with an event
        `{"path": rel, "file": id}` goes to `dir/<rel>` (`dir/<run_id>/<rel>` for all runs).
        """
        return self._bound().jobs._download(self, dir, only_last_run=only_last_run)


class AsyncJob(_JobBase):
    """`Job` of `AsyncOpenWeights`: `await job.refresh()`, `await job.runs`, `await job.wait()` …"""

    async def refresh(self) -> AsyncJob:
        """Fetch the job again; updates this object in place and returns it."""
        return self._replace_with(await self._bound().jobs.retrieve(self.id))

    @property
    def runs(self) -> Any:
        """Awaitable: `runs = await job.runs`, oldest first."""
        return self._bound().runs.list(job_id=self.id)

    async def cancel(self) -> AsyncJob:
        return self._replace_with(await self._bound().jobs.cancel(self.id))

    async def restart(self) -> AsyncJob:
        """Put a failed or canceled job back to pending (attempts reset)."""
        return self._replace_with(await self._bound().jobs.restart(self.id))

    async def wait(
        self,
        *,
        timeout_s: float | None = None,
        raise_on_failure: bool = False,
        timeout: float | None = None,
    ) -> AsyncJob:
        """Wait until the job is completed, failed or canceled; returns this job, refreshed."""
        fresh = await self._bound().jobs.wait(
            self.id, timeout_s=timeout_s, raise_on_failure=False, timeout=timeout
        )
        self._replace_with(fresh)
        _raise_if_failed(self, raise_on_failure)
        return self

    async def download(self, dir: str | Path, *, only_last_run: bool = True) -> list[Path]:
        """Download logs and result files; returns the paths written."""
        return await self._bound().jobs._download(self, dir, only_last_run=only_last_run)


# ---------------------------------------------------------------- I/O-free helpers


@dataclass
class PreparedJob:
    """A validated job request plus the local files it mounts (local file id → path)."""

    request: JobCreateParams
    uploads: dict[str, Path] = field(default_factory=dict)

    def with_file_ids(self, ids: dict[str, str]) -> JobCreateParams:
        """The request with mounted file ids replaced by the ids the server gave them."""
        mounted = self.request.params.get("mounted_files")
        if not ids or not isinstance(mounted, dict):
            return self.request
        params = dict(self.request.params)
        params["mounted_files"] = {path: ids.get(fid, fid) for path, fid in mounted.items()}
        return self.request.model_copy(update={"params": params})


def _job_create_params(**kwargs: Any) -> JobCreateParams:
    try:
        return JobCreateParams(**kwargs)
    except ValidationError as e:
        raise format_validation_error("the job", e) from None


def _create_body(request: JobCreateParams) -> dict[str, Any]:
    return request.model_dump(mode="json", exclude_none=True)


def _find_body(
    *,
    type: str | None,
    status: str | None,
    limit: int,
    id_prefix: str | None,
    params: dict[str, Any],
) -> dict[str, Any]:
    body: dict[str, Any] = {"params": params, "limit": limit}
    if type is not None:
        body["type"] = type
    if status is not None:
        body["status"] = status
    if id_prefix is not None:
        body["id_prefix"] = id_prefix
    return body


def _condition_met(job: JobObject, until: Until) -> bool:
    if until == "started":
        return job.status != "pending"
    return job.status in TERMINAL_STATUSES


def _resolve_timeout(timeout_s: float | None, timeout: float | None) -> float | None:
    return timeout_s if timeout_s is not None else timeout


def _poll_s(deadline: float | None, tty: bool) -> int:
    poll = WAIT_POLL_TTY_S if tty else WAIT_POLL_S
    if deadline is not None:
        poll = min(poll, max(1, math.ceil(deadline - time.monotonic())))
    return poll


def _wait_timed_out(job_id: str, job: JobObject | None, until: Until, t: float) -> WaitTimeoutError:
    status = job.status if job is not None else "unknown"
    goal = "start" if until == "started" else "finish"
    reason = f" ({job.pending_reason})" if job is not None and job.pending_reason else ""
    return WaitTimeoutError(
        f"Job {job_id!r} did not {goal} within {t:g} s; it is {status}{reason}.", job=job
    )


def _raise_if_failed(job: JobObject, raise_on_failure: bool) -> None:
    if not raise_on_failure or job.status not in ("failed", "canceled"):
        return
    if job.status == "canceled":
        raise JobFailedError(f"Job {job.id!r} was canceled.", job=job)
    raise JobFailedError(f"Job {job.id!r} failed: {job.error or 'no reason given'}", job=job)


@dataclass
class _ProgressCursor:
    """Newest event seen so far, for the status line (events are fetched incrementally)."""

    after: int | None = None
    latest: dict[str, Any] | None = None

    def feed(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self.after = ev["id"]
            data = ev.get("data") or {}
            if describe_progress(data)[2]:
                self.latest = data


def _artifact(event: dict[str, Any]) -> tuple[str, str] | None:
    """(file id, relative path) of an event that reports a result file."""
    data = event.get("data") or {}
    fid = event.get("file") or data.get("file")
    if not is_file_id(fid):
        return None
    rel = data.get("path") if isinstance(data.get("path"), str) else fid.replace(":", "_")
    return fid, rel


def _safe_join(root: Path, rel: str) -> Path:
    """`root/rel`, never outside `root` (a path from a job is not trusted)."""
    parts = [
        p for p in PurePosixPath(rel.replace("\\", "/")).parts if p not in ("/", "..", ".", "")
    ]
    if not parts:
        raise OpenWeightsError(f"Result path {rel!r} names no file.")
    return root.joinpath(*parts)


def _runs_to_download(runs: list[Run], only_last_run: bool) -> list[Run]:
    return runs[-1:] if only_last_run else runs


# ---------------------------------------------------------------- sync resource


class JobsResource(SyncResource):
    """`ow.jobs`: every job of the organization, whatever its kind."""

    def _job(self, body: dict[str, Any]) -> Job:
        job = Job.model_validate(body)
        job._client = self._client
        return job

    def create(
        self,
        *,
        type: str,
        script: str,
        params: dict[str, Any] | None = None,
        id_prefix: str = "job",
        model: str | None = None,
        requires_vram_gb: float = 0,
        allowed_hardware: list[str] | None = None,
        docker_image: str | None = None,
        job_id_suffix: str | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
    ) -> Job:
        """Submit a job as it is (low level; custom kinds use `ow.<kind>.create(**params)`).

        The id is derived from type, params and script: submitting the same job again returns
        it, and a failed or canceled one goes back to pending.
        """
        request = _job_create_params(
            type=type,
            script=script,
            params=params or {},
            id_prefix=id_prefix,
            model=model,
            requires_vram_gb=requires_vram_gb,
            allowed_hardware=allowed_hardware,
            docker_image=docker_image,
            job_id_suffix=job_id_suffix,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
        )
        return self._create(request)

    def _create(self, request: JobCreateParams) -> Job:
        # Creating is idempotent (the id is a content hash), so a resend is safe.
        response = self._http.request("POST", "/v1/jobs", json=_create_body(request), retry=True)
        return self._job(response.json())

    def _submit(self, prepared: PreparedJob) -> Job:
        """Upload the mounted files the server lacks, then create the job."""
        ids: dict[str, str] = {}
        if prepared.uploads:
            ids = self._client.files._upload_paths(prepared.uploads, purpose="custom_job_file")
        return self._create(prepared.with_file_ids(ids))

    def list(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        limit: int = 100,
        id_prefix: str | None = None,
    ) -> list[Job]:
        """Jobs, newest first; `id_prefix` keeps only ids starting with `{id_prefix}-`."""
        out: list[Job] = []
        after = None
        while len(out) < limit:
            query = {"status": status, "type": type, "id_prefix": id_prefix, "after": after}
            query["limit"] = min(1000, limit - len(out))
            body = self._http.request("GET", "/v1/jobs", params=query).json()
            data = body.get("data") or []
            out += [self._job(d) for d in data]
            if not body.get("has_more") or not data:
                break
            after = data[-1]["id"]
        return out[:limit]

    def retrieve(self, job_id: str) -> Job:
        return self._job(self._http.request("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> Job:
        """Cancel a pending or running job (`ConflictError` when it already ended)."""
        return self._job(self._http.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def restart(self, job_id: str) -> Job:
        """Put a failed or canceled job back to pending (`ConflictError` while it is live)."""
        return self._job(self._http.request("POST", f"/v1/jobs/{job_id}/restart").json())

    def find(
        self,
        *,
        type: str | None = None,
        status: str | None = None,
        limit: int = 100,
        id_prefix: str | None = None,
        **params: Any,
    ) -> builtins.list[Job]:
        """Jobs whose `params.validated_params` contain these values: `find(model="x")`."""
        body = _find_body(type=type, status=status, limit=limit, id_prefix=id_prefix, params=params)
        response = self._http.request("POST", "/v1/jobs/find", json=body, retry=True)
        return [self._job(d) for d in response.json().get("data") or []]

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        raise_on_failure: bool = False,
        timeout: float | None = None,
        until: Until = "terminal",
    ) -> Job:
        """Block until the job ends (`until="started"`: until it leaves pending); returns it.

        Long-polls the server, so it returns as soon as the job changes. Shows a status line
        on a terminal. `timeout` is an alias of `timeout_s`; past it, `WaitTimeoutError`.
        """
        t = _resolve_timeout(timeout_s, timeout)
        deadline = None if t is None else time.monotonic() + t
        line = JobStatusLine(job_id)
        cursor = _ProgressCursor()
        job: Job | None = None
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    raise _wait_timed_out(job_id, job, until, t or 0)
                poll = _poll_s(deadline, line.enabled)
                job = self._job(
                    self._http.request(
                        "GET",
                        f"/v1/jobs/{job_id}/wait",
                        params={"timeout_s": poll, "until": until},
                        timeout_s=poll + _WAIT_GRACE_S,
                    ).json()
                )
                if line.enabled:
                    self._feed_progress(job_id, cursor)
                    line.update(job, cursor.latest)
                if _condition_met(job, until):
                    break
        finally:
            line.close()
        _raise_if_failed(job, raise_on_failure)
        return job

    def _feed_progress(self, job_id: str, cursor: _ProgressCursor) -> None:
        try:
            while True:
                body = self._http.request(
                    "GET",
                    "/v1/events",
                    params={"job_id": job_id, "after": cursor.after, "limit": 1000},
                ).json()
                cursor.feed(body.get("data") or [])
                if not body.get("has_more"):
                    return
        except APIError:
            return  # the status line is a nicety: never let it break wait()

    def _download(
        self, job: JobObject, dir: str | Path, *, only_last_run: bool
    ) -> builtins.list[Path]:
        root = Path(dir)
        written: list[Path] = []
        files = self._client.files
        for run in _runs_to_download(self._client.runs.list(job_id=job.id), only_last_run):
            target = root if only_last_run else root / str(run.id)
            log_path = root / "logs" / f"{run.id}.log"
            if run.log_file:
                written.append(files.download(run.log_file, log_path))
            else:  # still running: what the log holds so far
                try:
                    text = self._client.runs.log_content(run.id)
                except NotFoundError:
                    text = None
                if text is not None:
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    log_path.write_bytes(text)
                    written.append(log_path)
            for event in self._client.events.list(run_id=run.id):
                artifact = _artifact(event)
                if artifact is not None:
                    fid, rel = artifact
                    written.append(files.download(fid, _safe_join(target, rel)))
        return written


# ---------------------------------------------------------------- async resource


class AsyncJobsResource(AsyncResource):
    """`ow.jobs` of `AsyncOpenWeights`."""

    def _job(self, body: dict[str, Any]) -> AsyncJob:
        job = AsyncJob.model_validate(body)
        job._client = self._client
        return job

    async def create(
        self,
        *,
        type: str,
        script: str,
        params: dict[str, Any] | None = None,
        id_prefix: str = "job",
        model: str | None = None,
        requires_vram_gb: float = 0,
        allowed_hardware: list[str] | None = None,
        docker_image: str | None = None,
        job_id_suffix: str | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
    ) -> AsyncJob:
        """Submit a job as it is (low level; custom kinds use `ow.<kind>.create(**params)`)."""
        request = _job_create_params(
            type=type,
            script=script,
            params=params or {},
            id_prefix=id_prefix,
            model=model,
            requires_vram_gb=requires_vram_gb,
            allowed_hardware=allowed_hardware,
            docker_image=docker_image,
            job_id_suffix=job_id_suffix,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
        )
        return await self._create(request)

    async def _create(self, request: JobCreateParams) -> AsyncJob:
        response = await self._http.request(
            "POST", "/v1/jobs", json=_create_body(request), retry=True
        )
        return self._job(response.json())

    async def _submit(self, prepared: PreparedJob) -> AsyncJob:
        ids: dict[str, str] = {}
        if prepared.uploads:
            ids = await self._client.files._upload_paths(
                prepared.uploads, purpose="custom_job_file"
            )
        return await self._create(prepared.with_file_ids(ids))

    async def list(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        limit: int = 100,
        id_prefix: str | None = None,
    ) -> list[AsyncJob]:
        """Jobs, newest first; `id_prefix` keeps only ids starting with `{id_prefix}-`."""
        out: list[AsyncJob] = []
        after = None
        while len(out) < limit:
            query = {"status": status, "type": type, "id_prefix": id_prefix, "after": after}
            query["limit"] = min(1000, limit - len(out))
            body = (await self._http.request("GET", "/v1/jobs", params=query)).json()
            data = body.get("data") or []
            out += [self._job(d) for d in data]
            if not body.get("has_more") or not data:
                break
            after = data[-1]["id"]
        return out[:limit]

    async def retrieve(self, job_id: str) -> AsyncJob:
        return self._job((await self._http.request("GET", f"/v1/jobs/{job_id}")).json())

    async def cancel(self, job_id: str) -> AsyncJob:
        """Cancel a pending or running job (`ConflictError` when it already ended)."""
        return self._job((await self._http.request("POST", f"/v1/jobs/{job_id}/cancel")).json())

    async def restart(self, job_id: str) -> AsyncJob:
        """Put a failed or canceled job back to pending (`ConflictError` while it is live)."""
        return self._job((await self._http.request("POST", f"/v1/jobs/{job_id}/restart")).json())

    async def find(
        self,
        *,
        type: str | None = None,
        status: str | None = None,
        limit: int = 100,
        id_prefix: str | None = None,
        **params: Any,
    ) -> builtins.list[AsyncJob]:
        """Jobs whose `params.validated_params` contain these values: `find(model="x")`."""
        body = _find_body(type=type, status=status, limit=limit, id_prefix=id_prefix, params=params)
        response = await self._http.request("POST", "/v1/jobs/find", json=body, retry=True)
        return [self._job(d) for d in response.json().get("data") or []]

    async def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        raise_on_failure: bool = False,
        timeout: float | None = None,
        until: Until = "terminal",
    ) -> AsyncJob:
        """Wait until the job ends (`until="started"`: until it leaves pending); returns it."""
        t = _resolve_timeout(timeout_s, timeout)
        deadline = None if t is None else time.monotonic() + t
        line = JobStatusLine(job_id)
        cursor = _ProgressCursor()
        job: AsyncJob | None = None
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    raise _wait_timed_out(job_id, job, until, t or 0)
                poll = _poll_s(deadline, line.enabled)
                response = await self._http.request(
                    "GET",
                    f"/v1/jobs/{job_id}/wait",
                    params={"timeout_s": poll, "until": until},
                    timeout_s=poll + _WAIT_GRACE_S,
                )
                job = self._job(response.json())
                if line.enabled:
                    await self._feed_progress(job_id, cursor)
                    line.update(job, cursor.latest)
                if _condition_met(job, until):
                    break
        finally:
            line.close()
        _raise_if_failed(job, raise_on_failure)
        return job

    async def _feed_progress(self, job_id: str, cursor: _ProgressCursor) -> None:
        try:
            while True:
                response = await self._http.request(
                    "GET",
                    "/v1/events",
                    params={"job_id": job_id, "after": cursor.after, "limit": 1000},
                )
                body = response.json()
                cursor.feed(body.get("data") or [])
                if not body.get("has_more"):
                    return
        except APIError:
            return

    async def _download(
        self, job: JobObject, dir: str | Path, *, only_last_run: bool
    ) -> builtins.list[Path]:
        root = Path(dir)
        written: list[Path] = []
        files = self._client.files
        runs = await self._client.runs.list(job_id=job.id)
        for run in _runs_to_download(runs, only_last_run):
            target = root if only_last_run else root / str(run.id)
            log_path = root / "logs" / f"{run.id}.log"
            if run.log_file:
                written.append(await files.download(run.log_file, log_path))
            else:
                try:
                    text = await self._client.runs.log_content(run.id)
                except NotFoundError:
                    text = None
                if text is not None:
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    log_path.write_bytes(text)
                    written.append(log_path)
            for event in await self._client.events.list(run_id=run.id):
                artifact = _artifact(event)
                if artifact is not None:
                    fid, rel = artifact
                    written.append(await files.download(fid, _safe_join(target, rel)))
        return written
