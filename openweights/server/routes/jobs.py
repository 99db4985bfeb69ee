"""Jobs: create (idempotent by content hash), list, find, wait (long-poll), cancel, restart."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from openweights import types as t
from openweights.server import convert
from openweights.server.auth import principal, require
from openweights.server.fast import hot
from openweights.server.notify import CHANNEL, job_key, queue_key, run_key
from openweights.server.routes._errors import ERROR_RESPONSES
from openweights.store import jobs as q
from openweights.store.orgs import Principal

router = APIRouter(prefix="/v1", tags=["jobs"], responses=ERROR_RESPONSES)


def _with_reason(state, conn, row: dict) -> t.JobObject:
    reason = None
    if row["status"] == "pending":
        reason = q.pending_reason(conn, row, state.db.now(conn), state.settings.worker_offline_s)
    return convert.job(row, reason)


@router.post("/jobs", response_model=t.JobObject)
async def create_job(
    body: t.JobCreateParams, request: Request, p: Principal = Depends(principal)
) -> t.JobObject:
    """Submit a job. The same type + params + script gives the same id: a pending, running or
    completed job is returned as it is; a failed or canceled one goes back to pending."""
    return await create(request.app.state.ow, p, body)


async def create(state, p: Principal, body: t.JobCreateParams) -> t.JobObject:
    """The create route (FastAPI's and `fast.FastPath`'s): the write transaction, then the
    pending reason in a read transaction (no write lock held for it). Parked claims are woken as
    soon as the job is committed, before the reason is measured."""
    require(p, "user", "run")
    h = hot(state)

    def write(conn):
        row, queued = q.create_job(
            conn,
            p.org_id,
            body,
            h.now(conn),
            state.settings.max_attempts,
            lock=not state.db.is_sqlite,
        )
        keys = [queue_key(p.org_id), job_key(p.org_id, row["id"])] if queued else []
        state.publish(conn, *keys)
        return row, keys

    def reason(conn):
        offline_s = state.settings.worker_offline_s
        return convert.job(row, q.pending_reason(conn, row, h.now(conn), offline_s))

    if h.sqlite:  # short transactions on the event loop (see `fast.Hot`)
        row, keys = await h.run(write)
        state.notifier.notify(*keys)
        if row["status"] != "pending":
            return convert.job(row)
        await asyncio.sleep(0)  # a woken claim takes the job before the reason is measured
        return await h.run(reason, write=False)

    def both():  # PostgreSQL: one thread hop; a new job in one round trip
        nonlocal row
        now = h.fresh_now()
        if now is None:  # the clock is read again (at most once a second)
            now = h.run_sync(h.now, False)
        out = q.create_new_job_once(
            h.raw, p.org_id, body, now, state.settings.max_attempts,
            state.settings.worker_offline_s,
            lambda jid: (CHANNEL, [queue_key(p.org_id), job_key(p.org_id, jid)]),
        )  # fmt: skip
        if out is not None:
            row, why = out
            state.committed(queue_key(p.org_id), job_key(p.org_id, row["id"]))
            return convert.job(row, why)
        row, keys = h.run_sync(write)
        state.committed(*keys)
        return convert.job(row) if row["status"] != "pending" else h.run_sync(reason, False)

    row: dict = {}
    return await h.in_thread(both)


@router.get("/jobs", response_model=t.Page[t.JobObject])
async def list_jobs(
    request: Request,
    status: t.JobStatus | None = None,
    type: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=100, ge=1, le=1000),
    after: str | None = None,
    id_prefix: str | None = Query(
        default=None,
        pattern=t.ID_PREFIX_PATTERN,
        description="Only jobs whose id starts with `{id_prefix}-` (one kind of custom job).",
    ),
    p: Principal = Depends(principal),
) -> t.Page[t.JobObject]:
    """Jobs of the caller's org, newest first."""
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return q.list_jobs(
                conn, p.org_id, status=status, type=type, limit=limit, after=after,
                id_prefix=id_prefix,
            )  # fmt: skip

    rows, more = await state.call(work)
    return t.Page[t.JobObject](data=[convert.job(r) for r in rows], has_more=more)


@router.post("/jobs/find", response_model=t.Page[t.JobObject])
async def find_jobs(
    body: t.JobFindParams, request: Request, p: Principal = Depends(principal)
) -> t.Page[t.JobObject]:
    """Jobs whose `params.validated_params` contain the given values."""
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return q.find_jobs(
                conn,
                p.org_id,
                params=body.params,
                type=body.type,
                status=body.status,
                limit=body.limit,
                dialect=state.db.dialect,
                id_prefix=body.id_prefix,
            )

    return t.Page[t.JobObject](data=[convert.job(r) for r in await state.call(work)])


@router.get("/jobs/{job_id}", response_model=t.JobObject)
async def retrieve_job(
    job_id: str, request: Request, p: Principal = Depends(principal)
) -> t.JobObject:
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return _with_reason(state, conn, q.get_job(conn, p.org_id, job_id))

    return await state.call(work)


@router.get("/jobs/{job_id}/wait", response_model=t.JobObject)
async def wait_job(
    job_id: str,
    request: Request,
    timeout_s: float = Query(default=30.0, ge=0, le=60),
    until: Literal["terminal", "started"] = "terminal",
    p: Principal = Depends(principal),
) -> t.JobObject:
    """Long-poll: answer as soon as the job is finished (or started), or at the timeout."""
    state = request.app.state.ow
    deadline = time.monotonic() + timeout_s
    key = job_key(p.org_id, job_id)
    while True:
        ev = state.notifier.event(key)
        job = await retrieve_job(job_id, request, p)
        done = job.status in t.TERMINAL_STATUSES or (until == "started" and job.status != "pending")
        remaining = deadline - time.monotonic()
        if done or remaining <= 0 or await request.is_disconnected():
            return job
        await state.notifier.wait(ev, min(remaining, 5.0))


@router.post("/jobs/{job_id}/cancel", response_model=t.JobObject)
async def cancel_job(
    job_id: str, request: Request, p: Principal = Depends(principal)
) -> t.JobObject:
    """Cancel a pending or running job; a running one's worker stops it within seconds."""
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            row = q.cancel_job(conn, p.org_id, job_id, state.db.now(conn))
            keys = [job_key(p.org_id, job_id)] + (
                [run_key(row["current_run_id"])] if row["current_run_id"] else []
            )
            state.publish(conn, *keys)
            return row, keys

    row, keys = await state.call(work)
    state.notifier.notify(*keys)
    return convert.job(row)


@router.post("/jobs/{job_id}/restart", response_model=t.JobObject)
async def restart_job(
    job_id: str, request: Request, p: Principal = Depends(principal)
) -> t.JobObject:
    """Put a finished job back in the queue with fresh attempts."""
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            row = q.restart_job(conn, p.org_id, job_id, state.db.now(conn))
            state.publish(conn, queue_key(p.org_id), job_key(p.org_id, job_id))
            return row

    row = await state.call(work)
    state.notifier.notify(queue_key(p.org_id), job_key(p.org_id, job_id))
    return convert.job(row)


@router.get("/jobs/{job_id}/runs", response_model=t.Page[t.RunObject])
async def list_runs(
    job_id: str, request: Request, p: Principal = Depends(principal)
) -> t.Page[t.RunObject]:
    """The job's runs (attempts), oldest first: `runs[-1]` is the latest."""
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return q.list_runs(conn, p.org_id, job_id)

    return t.Page[t.RunObject](data=[convert.run(r) for r in await state.call(work)])
