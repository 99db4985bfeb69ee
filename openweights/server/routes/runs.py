"""Workers and runs: register, claim (long-poll), heartbeat (long-poll for cancel), logs,
events, completion. Every run call is fenced: only the job's live run is heard."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from openweights import types as t
from openweights.server import convert
from openweights.server.auth import principal, require
from openweights.server.fast import hot
from openweights.server.notify import Signal, job_key, queue_key, run_key
from openweights.server.pg_claim import Fallback, pg_claim
from openweights.server.routes._errors import ERROR_RESPONSES
from openweights.store import files as fstore
from openweights.store import jobs as q
from openweights.store.errors import Fenced, Invalid, StoreError
from openweights.store.orgs import Principal

#: Ids and byte offsets are 64-bit integers in the database: a bigger number is refused here
#: (422 naming the parameter), never passed to the driver (an overflow there was a 500).
BIGINT_MAX = 2**63 - 1
RunId = Annotated[int, Path(ge=1, le=BIGINT_MAX, description="A run's id.")]

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
MAX_LOG_CHUNK = 8 << 20


def _worker_for(conn, p: Principal, worker_id: str) -> dict:
    worker = q.get_worker(conn, p.org_id, worker_id)
    q.check_worker_caller(worker, p)
    return worker


# -- workers ---------------------------------------------------------------------------------


@router.post("/workers", response_model=t.WorkerObject, tags=["workers"])
async def register_worker(
    body: t.WorkerRegister, request: Request, p: Principal = Depends(principal)
) -> t.WorkerObject:
    require(p, "user", "worker")
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            now = state.db.now(conn)
            return q.register_worker(conn, p.org_id, body, p.token_id, now), now

    row, now = await state.call(work)
    return convert.worker(row, now, state.settings.worker_offline_s)


@router.get("/workers", response_model=t.Page[t.WorkerObject], tags=["workers"])
async def list_workers(
    request: Request, p: Principal = Depends(principal)
) -> t.Page[t.WorkerObject]:
    require(p, "user", "worker")
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return q.list_workers(conn, p.org_id), state.db.now(conn)

    rows, now = await state.call(work)
    return t.Page[t.WorkerObject](
        data=[convert.worker(r, now, state.settings.worker_offline_s) for r in rows]
    )


@router.post("/workers/{worker_id}/shutdown", response_model=t.WorkerObject, tags=["workers"])
async def shutdown_worker(
    worker_id: str, request: Request, p: Principal = Depends(principal)
) -> t.WorkerObject:
    require(p, "user", "worker")
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            _worker_for(conn, p, worker_id)
            now = state.db.now(conn)
            return q.shutdown_worker(conn, p.org_id, worker_id, now), now

    row, now = await state.call(work)
    state.notifier.notify(f"worker:{worker_id}")
    return convert.worker(row, now, state.settings.worker_offline_s)


@router.post(
    "/workers/{worker_id}/claim",
    response_model=t.ClaimResponse,
    responses={204: {"description": "No job came within wait_s."}},
    tags=["workers"],
)
async def claim(
    worker_id: str, body: t.ClaimRequest, request: Request, p: Principal = Depends(principal)
):
    """Long-poll for the oldest pending job that fits this worker; 204 when none came in time.
    With `done`, the worker's previous run is completed first (as `POST /v1/runs/{id}/complete`
    would): a worker needs one round trip per job."""
    out = await claim_loop(
        request.app.state.ow, p, worker_id, body.wait_s, request.is_disconnected, done=body.done
    )
    return Response(status_code=204) if out is None else out


async def claim_loop(
    state,
    p: Principal,
    worker_id: str,
    wait_s: float,
    is_disconnected: Callable[[], Awaitable[bool]],
    gone: Signal | None = None,
    done: t.RunDone | None = None,
) -> t.ClaimResponse | None:
    """The claim route (FastAPI's and `fast.FastPath`'s): complete the `done` run if any, then
    claim, or park until a job for the org is queued (or the worker is shut down, or the client
    leaves), then claim again."""
    require(p, "user", "worker")
    lease_s = state.settings.lease_s
    deadline = time.monotonic() + wait_s
    org_key = queue_key(p.org_id)

    def attempt(conn):
        # One write transaction of 6 statements (+1 NOTIFY on PostgreSQL): check in the worker
        # (touch + read), scan candidates, take one (run insert), start the job, mark the worker
        # busy, mint the run token; the org's secrets come from the cache.
        now = hot(state).now(conn)
        worker = q.checkin_worker(conn, p.org_id, worker_id, now)
        q.check_worker_caller(worker, p)
        c = q.claim(conn, worker, now, lease_s)
        if c is None:
            return None
        env = state.secret_env(conn, p.org_id)
        state.publish(conn, job_key(p.org_id, c.job["id"]))
        return c, env

    while True:
        ev = state.notifier.event(org_key)
        stop_ev = state.notifier.event(f"worker:{worker_id}")  # shutdown ends the long-poll at once
        fast = pg_claim(state, hot(state))
        if fast is not None:  # PostgreSQL: the common case as one function call
            if done is not None and _EMPTY_SHA not in state.known_blobs:
                await state.call(_empty_log, state)  # once per process: may write a blob
            try:
                completed, c = await fast.call(p, worker_id, lease_s, done, _EMPTY_SHA)
            except Fallback:
                pass  # nothing was written: the Python path below answers
            else:
                if completed is not None:
                    rid = completed["run_id"]
                    state.notifier.notify(
                        job_key(p.org_id, completed["job_id"]), run_key(rid),
                        queue_key(p.org_id), f"auth:run:{rid}", f"log:{rid}",
                    )  # fmt: skip
                done = None
                if c is not None:
                    env = state.cached_secret_env(p.org_id)
                    if env is None:
                        env = await hot(state).run(
                            lambda conn: state.secret_env(conn, p.org_id), write=False
                        )
                    state.notifier.notify(job_key(p.org_id, c.job["id"]))
                    return t.ClaimResponse(
                        run=convert.run(c.run),
                        job=convert.job(c.job),
                        token=c.token,
                        env=env,
                        lease_s=lease_s,
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0 or await is_disconnected():
                    return None
                await state.notifier.wait_any(
                    [ev, stop_ev] if gone is None else [ev, stop_ev, gone], min(remaining, 10.0)
                )
                if await is_disconnected():
                    return None
                continue
        if done is not None:
            # The last run's end first; without a log to store, in the claim's own transaction.
            _run, result = await complete_then(
                state, p, done.run_id, done.status, done.exit_code, done.error, attempt, "done"
            )
            done = None
            if result is _NOT_RUN:
                result = await hot(state).run(attempt)
        else:
            result = await hot(state).run(attempt)
        if result is not None:
            c, env = result
            state.notifier.notify(job_key(p.org_id, c.job["id"]))
            # built after the commit: the write lock is not held for it
            return t.ClaimResponse(
                run=convert.run(c.run),
                job=convert.job(c.job),
                token=c.token,
                env=env,
                lease_s=lease_s,
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await is_disconnected():
            return None
        # Woken by a new or requeued job; the slice bounds how stale a missed wake-up can be.
        await state.notifier.wait_any(
            [ev, stop_ev] if gone is None else [ev, stop_ev, gone], min(remaining, 10.0)
        )
        if await is_disconnected():  # a worker that died while parked takes no job
            return None


# -- runs ------------------------------------------------------------------------------------


@router.get("/runs/{run_id}", response_model=t.RunObject, tags=["runs"])
async def retrieve_run(
    run_id: RunId, request: Request, p: Principal = Depends(principal)
) -> t.RunObject:
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return q.get_run(conn, p.org_id, run_id)

    return convert.run(await state.call(work))


@router.post("/runs/{run_id}/heartbeat", response_model=t.HeartbeatResponse, tags=["runs"])
async def heartbeat(
    run_id: RunId, body: t.HeartbeatRequest, request: Request, p: Principal = Depends(principal)
) -> t.HeartbeatResponse:
    """Renew the lease now; then wait up to `wait_s` and answer early when the job is canceled."""
    return await heartbeat_run(request.app.state.ow, p, run_id, body.wait_s)


async def heartbeat_run(state, p: Principal, run_id: int, wait_s: float) -> t.HeartbeatResponse:
    """The heartbeat route (FastAPI's and `fast.FastPath`'s)."""
    require(p, "user", "worker")
    key = run_key(run_id)
    ev = state.notifier.event(key)

    def renew(conn):
        return q.heartbeat(
            conn, p.org_id, run_id, hot(state).now(conn), state.settings.lease_s, None, caller=p
        )

    lease, cancel = await hot(state).run(renew)
    if cancel or wait_s <= 0:
        return t.HeartbeatResponse(cancel=cancel, lease_expires_at=lease)
    await state.notifier.wait(ev, wait_s)

    def check(conn):
        status, job_status = q.run_status(conn, p.org_id, run_id)
        return job_status == "canceled", status

    cancel, status = await hot(state).run(check, write=False)
    if status == "lost":
        raise Fenced(f"Run {run_id} is {status}; stop it.")
    # a run its own worker just completed while this heartbeat was parked: nothing to stop
    return t.HeartbeatResponse(cancel=cancel, lease_expires_at=lease)


@router.post("/runs/{run_id}/logs", tags=["runs"])
async def append_log(
    run_id: RunId,
    request: Request,
    offset: int = Query(ge=0, le=BIGINT_MAX),
    p: Principal = Depends(principal),
) -> dict:
    """Append bytes at `offset` of the run's log; a resent chunk is not duplicated."""
    require(p, "user", "worker")
    state = request.app.state.ow
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_LOG_CHUNK:
            raise Invalid(f"Log chunks are limited to {MAX_LOG_CHUNK} bytes.", param="body")

    def work():
        with state.db.write() as conn:
            return q.append_log(
                conn, p.org_id, run_id, offset, bytes(data), state.db.now(conn), None, caller=p
            )

    size = await state.call(work)
    state.notifier.notify(f"log:{run_id}")
    return {"size": size}


@router.get(
    "/runs/{run_id}/log",
    response_class=StreamingResponse,
    tags=["runs"],
    responses={200: {"content": {"text/plain": {}}}},
)
async def read_log(
    run_id: RunId,
    request: Request,
    offset: int = Query(default=0, ge=0, le=BIGINT_MAX),
    follow: bool = False,
    p: Principal = Depends(principal),
):
    """The run's log from `offset`; with `follow`, streamed live until the run ends."""
    state = request.app.state.ow

    def load(off: int):
        with state.db.read() as conn:
            run = q.get_run(conn, p.org_id, run_id)
            if run["log_file"]:
                f = fstore.get_file(conn, p.org_id, run["log_file"])
                return run, None, f
            return run, q.read_log_chunks(conn, run_id, off), None

    first = await state.call(load, offset)  # 404 before the stream starts

    async def body():
        nonlocal offset
        run, chunks, f = first
        while True:
            if f is not None:
                if offset < f["bytes"]:
                    for chunk in state.blobs.iter_bytes(f["sha256"], offset):
                        yield chunk
                return
            for off, data in chunks:
                yield data
                offset = off + len(data)
            if not follow or run["status"] != "in_progress" or await request.is_disconnected():
                if run["status"] != "in_progress" and follow:
                    run, chunks, f = await state.call(load, offset)
                    if f is not None or chunks:
                        continue
                return
            ev = state.notifier.event(f"log:{run_id}")
            ev_run = state.notifier.event(run_key(run_id))
            run, chunks, f = await state.call(load, offset)
            if chunks or f is not None or run["status"] != "in_progress":
                continue
            await state.notifier.wait_any([ev, ev_run], 10.0)
            run, chunks, f = await state.call(load, offset)

    return StreamingResponse(body(), media_type="text/plain; charset=utf-8")


@router.post("/runs/{run_id}/events", tags=["runs"])
async def add_events(
    run_id: RunId, body: t.EventsCreate, request: Request, p: Principal = Depends(principal)
) -> dict:
    """Append events to a live run (`ow.run.log`, metrics, uploads)."""
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            now = state.db.now(conn)
            run, _job = q.live_run(conn, p.org_id, run_id, now, caller=p)
            return q.add_events(conn, run, body.events, now)

    n = await state.call(work)
    state.notifier.notify(f"events:{run_id}")
    return {"count": n}


@router.get("/events", response_model=t.Page[t.EventObject], tags=["runs"])
async def list_events(
    request: Request,
    job_id: str | None = None,
    run_id: int | None = Query(default=None, ge=1, le=BIGINT_MAX),
    after: int | None = Query(default=None, ge=0, le=BIGINT_MAX),
    limit: int = Query(default=1000, ge=1, le=10_000),
    p: Principal = Depends(principal),
) -> t.Page[t.EventObject]:
    """Events of a job (all its runs) or of one run, oldest first."""
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return q.list_events(
                conn, p.org_id, job_id=job_id, run_id=run_id, after=after, limit=limit
            )

    rows, more = await state.call(work)
    return t.Page[t.EventObject](data=[convert.event(r) for r in rows], has_more=more)


@router.post("/runs/{run_id}/complete", response_model=t.RunObject, tags=["runs"])
async def complete_run(
    run_id: RunId, body: t.RunCompleteRequest, request: Request, p: Principal = Depends(principal)
) -> t.RunObject:
    """The worker's final word on a run. A resend of the same status is answered the same."""
    return await complete(request.app.state.ow, p, run_id, body.status, body.exit_code, body.error)


async def complete(
    state, p: Principal, run_id: int, status: str, exit_code: int | None, error: str | None
) -> t.RunObject:
    """The complete route (FastAPI's and `fast.FastPath`'s)."""
    run, _ = await complete_then(state, p, run_id, status, exit_code, error)
    return convert.run(run)


_NOT_RUN = object()


async def complete_then(
    state,
    p: Principal,
    run_id: int,
    status: str,
    exit_code: int | None,
    error: str | None,
    then: Callable[[Any], Any] | None = None,
    param: str | None = None,
) -> tuple[dict, Any]:
    """Complete the run; then, in the same write transaction when the run has no log to store
    (most short jobs), `then(conn)`: (the run, what `then` returned, or `_NOT_RUN` when it
    did not run). The completion's own errors name `param` (a claim's `done`); an error of
    `then` rolls the completion back with it."""
    require(p, "user", "worker")

    def finish(conn, run: dict, job: dict, now: float, sha: str, size: int) -> list[str]:
        log_file = fstore.add_file_once(
            conn,
            org_id=p.org_id,
            purpose="log",
            filename=f"run-{run_id}.log",
            size=size,
            sha256=sha,
            now=now,
        )
        q.finish_run(
            conn,
            run,
            job,
            status=status,
            now=now,
            exit_code=exit_code,
            error=error,
            log_file=log_file,
        )
        if run["log_size"]:
            q.delete_log_chunks(conn, run_id)
        keys = [
            job_key(p.org_id, job["id"]),
            run_key(run_id),
            queue_key(p.org_id),
            f"auth:run:{run_id}",  # the job's token stops working
        ]
        state.publish(conn, *keys)
        return keys

    def live(conn, now: float) -> tuple[dict, dict | None]:
        """The locked run and job; no job when the run ended already with this same status
        (a resend: answered the same)."""
        run, job = q.lock_run(conn, p.org_id, run_id)
        q.check_run_caller(run, p)
        if run["status"] != "in_progress":
            if run["status"] == status:
                return run, None
            raise Fenced(f"Run {run_id} is already {run['status']}.")
        # Still the live run (no other attempt exists) even if its lease just lapsed and the
        # sweeper has not seen it yet: accepting it cannot give the job a second completion.
        q.check_live(run, job, now, check_lease=False)
        return run, job

    def first(conn):
        # Most runs of short jobs have no log: one write transaction.
        try:
            now = hot(state).now(conn)
            run, job = live(conn, now)
            if job is None:
                out = run, []
            elif not run["log_size"]:
                sha = _empty_log(state)
                out = run, finish(conn, run, job, now, sha, 0)
            else:
                return None  # a log: stored below, outside any write transaction
        except StoreError as e:
            raise _named(e, param) from None
        return (*out, _NOT_RUN if then is None else then(conn))

    def with_log():
        # A log is first written to the blob store outside any write transaction, which then
        # stays short.
        for attempt in range(3):
            with state.db.read() as conn:
                sha, size = _store_log(state, conn, run_id)
            with state.db.write() as conn:
                now = state.db.now(conn)
                run, job = live(conn, now)
                if job is None:
                    return run, []
                if run["log_size"] == size or attempt == 2:
                    return run, finish(conn, run, job, now, sha, size)
            # log bytes arrived after the blob was written: write it again
        raise AssertionError("unreachable: the last attempt finishes the run")

    if _EMPTY_SHA not in state.known_blobs:
        await state.call(_empty_log, state)  # once per process: may write a blob
    out = await hot(state).run(first)
    if out is None:
        try:
            out = (*await state.call(with_log), _NOT_RUN)
        except StoreError as e:
            raise _named(e, param) from None
    run, keys, then_out = out
    if keys:
        state.notifier.notify(*keys, f"log:{run_id}")
    return run, then_out


def _named(e: StoreError, param: str | None) -> StoreError:
    """`e`, its parameter named as part of `param` (`done.run_id`)."""
    if param is not None:
        e.param = f"{param}.{e.param}" if e.param else param
    return e


_EMPTY_SHA = hashlib.sha256().hexdigest()


def _empty_log(state) -> str:
    """sha256 of the empty log, its blob stored once per server process."""
    sha = hashlib.sha256().hexdigest()
    if sha not in state.known_blobs:
        if not state.blobs.exists(sha):
            import tempfile
            from pathlib import Path

            empty = Path(tempfile.mkstemp(dir=state.tmp_dir, prefix="log-")[1])
            state.blobs.put_file(sha, empty)
            empty.unlink(missing_ok=True)
        state.known_blobs.add(sha)
    return sha


def _store_log(state, conn, run_id: int) -> tuple[str, int]:
    """Write the run's log chunks as one blob; return (sha256, size)."""
    import tempfile
    from pathlib import Path

    h = hashlib.sha256()
    chunks = q.read_log_chunks(conn, run_id, 0)
    if not chunks:
        return _empty_log(state), 0
    fd, name = tempfile.mkstemp(dir=state.tmp_dir, prefix="log-")
    path = Path(name)
    n = 0
    try:
        with open(fd, "wb") as f:
            for _off, data in chunks:
                f.write(data)
                h.update(data)
                n += len(data)
        sha = h.hexdigest()
        state.blobs.put_file(sha, path)
        return sha, n
    finally:
        path.unlink(missing_ok=True)
