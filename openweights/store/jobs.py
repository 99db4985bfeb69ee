"""Jobs, runs, leases, logs and events: the queue.

Promise: at-least-once execution, zero lost jobs, at most one accepted completion per job.
Every worker call names its run; only the job's live run (`jobs.current_run_id`) is heard
(fencing). Lease times come from `Database.now`, never from a worker's clock.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update

from openweights.store import orgs
from openweights.store import schema as s
from openweights.store.errors import Conflict, Fenced, Invalid, NotFound

TERMINAL = ("completed", "failed", "canceled")
J, R, W, E = s.jobs, s.runs, s.workers, s.events


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def compute_job_id(
    org_id: str, *, type: str, params: dict, script: str, id_prefix: str, suffix: str | None
) -> str:
    """Content hash of what the job does: the same submission gives the same id, whatever
    the key order; hardware and VRAM are not part of it (they can be changed on resubmit)."""
    digest = hashlib.sha256(
        (canonical_json({"type": type, "params": params, "script": script}) + org_id).encode()
    ).hexdigest()[:12]
    return f"{id_prefix}-{digest}" + (f"-{suffix}" if suffix else "")


# -- jobs ------------------------------------------------------------------------------------


def create_job(
    conn: Connection, org_id: str, req: Any, now: float, default_max_attempts: int, *, lock: bool
) -> tuple[dict, bool]:
    """Insert, requeue (failed/canceled) or return the existing job. Returns (row, queued)."""
    suffix = req.job_id_suffix
    if suffix is None and isinstance(req.params.get("validated_params"), dict):
        suffix = req.params["validated_params"].get("job_id_suffix")
    jid = compute_job_id(
        org_id,
        type=req.type,
        params=req.params,
        script=req.script,
        id_prefix=req.id_prefix,
        suffix=suffix,
    )
    requirements = {
        "requires_vram_gb": req.requires_vram_gb,
        "allowed_hardware": req.allowed_hardware,
        "docker_image": req.docker_image,
        "timeout_s": req.timeout_s,
        "model": req.model,
    }
    if req.max_attempts is not None:
        requirements["max_attempts"] = req.max_attempts
    existing = _job_row(conn, org_id, jid, lock=lock)
    if existing is None:
        row = {
            "org_id": org_id,
            "id": jid,
            "type": req.type,
            "status": "pending",
            "params": req.params,
            "script": req.script,
            "outputs": None,
            "attempts": 0,
            "max_attempts": req.max_attempts or default_max_attempts,
            "error": None,
            "current_run_id": None,
            "worker_id": None,
            "created_at": now,
            "updated_at": now,
            "queued_at": now,
            "started_at": None,
            "finished_at": None,
            **requirements,
        }
        pk = conn.execute(insert(J).returning(J.c.pk), row).scalar_one()
        row["pk"] = pk
        return row, True
    if existing["status"] in ("failed", "canceled"):
        values = {
            "status": "pending",
            "attempts": 0,
            "outputs": None,
            "error": None,
            "current_run_id": None,
            "worker_id": None,
            "queued_at": now,
            "updated_at": now,
            "started_at": None,
            "finished_at": None,
            **requirements,
        }
        conn.execute(update(J).where(J.c.pk == existing["pk"]).values(**values))
        existing.update(values)
        return existing, True
    changed = {k: v for k, v in requirements.items() if existing.get(k) != v}
    if changed:
        changed["updated_at"] = now
        conn.execute(update(J).where(J.c.pk == existing["pk"]).values(**changed))
        existing.update(changed)
    return existing, existing["status"] == "pending" and bool(changed)


def _job_row(conn: Connection, org_id: str, job_id: str, *, lock: bool = False) -> dict | None:
    q = select(J).where(J.c.org_id == org_id, J.c.id == job_id)
    if lock:
        q = q.with_for_update()
    row = conn.execute(q).mappings().first()
    return dict(row) if row else None


def get_job(conn: Connection, org_id: str, job_id: str, *, lock: bool = False) -> dict:
    row = _job_row(conn, org_id, job_id, lock=lock)
    if row is None:
        raise NotFound(f"Job {job_id!r} not found.", param="job_id")
    return row


def list_jobs(
    conn: Connection,
    org_id: str,
    *,
    status: str | None = None,
    type: str | None = None,
    limit: int = 100,
    after: str | None = None,
) -> tuple[list[dict], bool]:
    q = select(J).where(J.c.org_id == org_id)
    if status:
        q = q.where(J.c.status == status)
    if type:
        q = q.where(J.c.type == type)
    if after:
        anchor = get_job(conn, org_id, after)
        q = q.where(
            or_(
                J.c.created_at < anchor["created_at"],
                and_(J.c.created_at == anchor["created_at"], J.c.pk < anchor["pk"]),
            )
        )
    q = q.order_by(J.c.created_at.desc(), J.c.pk.desc()).limit(limit + 1)
    rows = [dict(r) for r in conn.execute(q).mappings()]
    return rows[:limit], len(rows) > limit


def find_jobs(
    conn: Connection,
    org_id: str,
    *,
    params: dict,
    type: str | None,
    status: str | None,
    limit: int,
    dialect: str,
) -> list[dict]:
    """Jobs whose `params.validated_params` contain `params` (dicts by containment)."""
    q = select(J).where(J.c.org_id == org_id)
    if type:
        q = q.where(J.c.type == type)
    if status:
        q = q.where(J.c.status == status)
    if dialect == "postgresql" and params:
        from sqlalchemy import type_coerce
        from sqlalchemy.dialects.postgresql import JSONB

        q = q.where(type_coerce(J.c.params, JSONB).contains({"validated_params": params}))
        q = q.order_by(J.c.created_at.desc()).limit(limit)
        return [dict(r) for r in conn.execute(q).mappings()]
    out = []
    for r in conn.execute(q.order_by(J.c.created_at.desc())).mappings():
        vp = (r["params"] or {}).get("validated_params") or {}
        if _contains(vp, params):
            out.append(dict(r))
            if len(out) >= limit:
                break
    return out


def _contains(have: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and _contains(have[k], v) for k, v in want.items()
        )
    return have == want


def cancel_job(conn: Connection, org_id: str, job_id: str, now: float) -> dict:
    job = get_job(conn, org_id, job_id, lock=True)
    if job["status"] in TERMINAL:
        raise Conflict(
            f"Job {job_id!r} is {job['status']}; cannot cancel it. Resubmit it (or `restart`) to run it again."
        )
    values = {
        "status": "canceled",
        "updated_at": now,
        "finished_at": now,
        "error": "canceled by user",
    }
    conn.execute(update(J).where(J.c.pk == job["pk"]).values(**values))
    job.update(values)
    return job


def restart_job(conn: Connection, org_id: str, job_id: str, now: float) -> dict:
    job = get_job(conn, org_id, job_id, lock=True)
    if job["status"] in ("pending", "in_progress"):
        raise Conflict(f"Job {job_id!r} is {job['status']}; only a finished job can be restarted.")
    values = {
        "status": "pending",
        "attempts": 0,
        "outputs": None,
        "error": None,
        "current_run_id": None,
        "worker_id": None,
        "queued_at": now,
        "updated_at": now,
        "started_at": None,
        "finished_at": None,
    }
    conn.execute(update(J).where(J.c.pk == job["pk"]).values(**values))
    job.update(values)
    return job


def fits(job: dict, worker: dict) -> bool:
    if worker["any_hardware"]:
        hardware_ok = True
    elif job["allowed_hardware"]:
        hardware_ok = worker["hardware_type"] in job["allowed_hardware"]
    else:
        hardware_ok = (job["requires_vram_gb"] or 0) <= worker["vram_gb"]
    image_ok = worker["docker_image"] is None or job["docker_image"] in (
        None,
        worker["docker_image"],
    )
    return hardware_ok and image_ok


def pending_reason(conn: Connection, job: dict, now: float, offline_s: float) -> str:
    live = [
        dict(r)
        for r in conn.execute(
            select(W).where(
                W.c.org_id == job["org_id"],
                W.c.status == "active",
                W.c.last_seen_at >= now - offline_s,
            )
        ).mappings()
    ]
    need = (
        f"allowed_hardware {job['allowed_hardware']}"
        if job["allowed_hardware"]
        else f"{job['requires_vram_gb']:g} GB VRAM"
    )
    if job["docker_image"]:
        need += f", image {job['docker_image']}"
    if not live:
        return (
            f"No worker is running for this organization (the job needs {need}). Start one with "
            "`ow worker`, or run the cluster manager (`ow cluster`) to start GPU workers."
        )
    fitting = [w for w in live if fits(job, w)]
    if not fitting:
        offer = ", ".join(sorted({f"{w['hardware_type']} ({w['vram_gb']:g} GB)" for w in live}))
        return f"No live worker fits: the job needs {need}; live workers offer {offer}."
    ahead = conn.execute(
        select(func.count())
        .select_from(J)
        .where(
            J.c.org_id == job["org_id"], J.c.status == "pending", J.c.queued_at < job["queued_at"]
        )
    ).scalar_one()
    busy = sum(1 for w in fitting if w["current_run_id"] is not None)
    return f"Waiting for a free worker: {busy} of {len(fitting)} fitting worker(s) busy, {ahead} job(s) ahead."


# -- workers ---------------------------------------------------------------------------------


def register_worker(
    conn: Connection, org_id: str, req: Any, token_id: str | None, now: float
) -> dict:
    row = {
        "id": f"worker-{uuid.uuid4().hex[:12]}",
        "org_id": org_id,
        "name": req.name,
        "status": "active",
        "hardware": req.hardware.model_dump(),
        "hardware_type": req.hardware.hardware_type,
        "vram_gb": req.hardware.vram_gb,
        "docker_image": req.docker_image,
        "any_hardware": req.any_hardware,
        "cached_models": list(req.cached_models),
        "provider": req.provider,
        "token_id": token_id,
        "current_run_id": None,
        "last_seen_at": now,
        "created_at": now,
    }
    conn.execute(insert(W), row)
    return row


def get_worker(conn: Connection, org_id: str, worker_id: str) -> dict:
    row = (
        conn.execute(select(W).where(W.c.id == worker_id, W.c.org_id == org_id)).mappings().first()
    )
    if row is None:
        raise NotFound(f"Worker {worker_id!r} not found.", param="worker_id")
    return dict(row)


def list_workers(conn: Connection, org_id: str) -> list[dict]:
    return [
        dict(r)
        for r in conn.execute(
            select(W).where(W.c.org_id == org_id).order_by(W.c.created_at)
        ).mappings()
    ]


def shutdown_worker(conn: Connection, org_id: str, worker_id: str, now: float) -> dict:
    get_worker(conn, org_id, worker_id)
    conn.execute(update(W).where(W.c.id == worker_id).values(status="shutdown", last_seen_at=now))
    return get_worker(conn, org_id, worker_id)


def touch_worker(conn: Connection, worker_id: str, now: float) -> None:
    conn.execute(update(W).where(W.c.id == worker_id).values(last_seen_at=now))


# -- claim -----------------------------------------------------------------------------------


@dataclass
class Claim:
    run: dict
    job: dict
    token: str


def claim(
    conn: Connection, worker: dict, now: float, lease_s: float, *, skip_locked: bool
) -> Claim | None:
    """Atomically take the oldest pending job of the worker's org that fits it."""
    if worker["status"] != "active":
        raise Conflict(f"Worker {worker['id']!r} is shut down; it takes no more jobs.")
    # Scan light columns without locks, then lock only the row we take: locking a whole batch
    # (FOR UPDATE SKIP LOCKED LIMIT n) would hide every other pending job from concurrent claims.
    cols = [
        J.c.pk,
        J.c.queued_at,
        J.c.requires_vram_gb,
        J.c.allowed_hardware,
        J.c.docker_image,
        J.c.model,
    ]
    base = select(*cols).where(J.c.org_id == worker["org_id"], J.c.status == "pending")
    if not worker["any_hardware"]:
        base = base.where(
            or_(J.c.allowed_hardware.isnot(None), J.c.requires_vram_gb <= worker["vram_gb"])
        )
    if worker["docker_image"] is not None:
        base = base.where(
            or_(J.c.docker_image.is_(None), J.c.docker_image == worker["docker_image"])
        )
    cached = set(worker["cached_models"] or [])
    chosen = None
    cursor = None
    batch = 8  # the first few usually fit; widen only when they do not
    while chosen is None:
        q = base
        if cursor is not None:
            q = q.where(
                or_(J.c.queued_at > cursor[0], and_(J.c.queued_at == cursor[0], J.c.pk > cursor[1]))
            )
        rows = [
            dict(r) for r in conn.execute(q.order_by(J.c.queued_at, J.c.pk).limit(batch)).mappings()
        ]
        if not rows:
            return None
        candidates = [r for r in rows if fits(r, worker)]
        cached_first = [r for r in candidates if r["model"] and r["model"] in cached]
        for cand in cached_first + [r for r in candidates if r not in cached_first]:
            lock = select(J).where(J.c.pk == cand["pk"], J.c.status == "pending")
            if skip_locked:
                lock = lock.with_for_update(skip_locked=True)
            row = conn.execute(lock).mappings().first()
            if row is not None:
                chosen = dict(row)
                break
        cursor = (rows[-1]["queued_at"], rows[-1]["pk"])
        batch = 64
    attempt = chosen["attempts"] + 1
    run = {
        "org_id": worker["org_id"],
        "job_pk": chosen["pk"],
        "worker_id": worker["id"],
        "attempt": attempt,
        "status": "in_progress",
        "lease_expires_at": now + lease_s,
        "started_at": now,
        "finished_at": None,
        "exit_code": None,
        "error": None,
        "log_size": 0,
        "log_file": None,
        "hardware": worker["hardware_type"],
    }
    run["id"] = conn.execute(insert(R).returning(R.c.id), run).scalar_one()
    job_values = {
        "status": "in_progress",
        "attempts": attempt,
        "current_run_id": run["id"],
        "worker_id": worker["id"],
        "updated_at": now,
        "started_at": chosen["started_at"] or now,
    }
    done = conn.execute(
        update(J).where(J.c.pk == chosen["pk"], J.c.status == "pending").values(**job_values)
    ).rowcount
    if done != 1:  # cannot happen under the row lock / single writer; refuse rather than double-run
        raise Conflict("claim raced with another writer")
    chosen.update(job_values)
    conn.execute(
        update(W).where(W.c.id == worker["id"]).values(current_run_id=run["id"], last_seen_at=now)
    )
    _, token = orgs.create_token(
        conn,
        org_id=worker["org_id"],
        name=f"run {run['id']}",
        kind="run",
        now=now,
        run_id=run["id"],
    )
    return Claim(run=run, job=chosen, token=token)


# -- runs ------------------------------------------------------------------------------------


def get_run(conn: Connection, org_id: str, run_id: int, *, lock: bool = False) -> dict:
    q = (
        select(R, J.c.id.label("job_id"))
        .join(J, J.c.pk == R.c.job_pk)
        .where(R.c.id == run_id, R.c.org_id == org_id)
    )
    if lock:
        q = q.with_for_update(of=R)
    row = conn.execute(q).mappings().first()
    if row is None:
        raise NotFound(f"Run {run_id} not found.", param="run_id")
    return dict(row)


def list_runs(conn: Connection, org_id: str, job_id: str) -> list[dict]:
    job = get_job(conn, org_id, job_id)
    q = select(R).where(R.c.job_pk == job["pk"]).order_by(R.c.id)
    return [dict(r, job_id=job_id) for r in conn.execute(q).mappings()]


def live_run(
    conn: Connection,
    org_id: str,
    run_id: int,
    now: float,
    *,
    worker_id: str | None = None,
    check_lease: bool = True,
) -> tuple[dict, dict]:
    """The run and its job, if this run is still the job's live run; else raise Fenced."""
    run = get_run(conn, org_id, run_id, lock=True)
    job = conn.execute(select(J).where(J.c.pk == run["job_pk"]).with_for_update()).mappings().one()
    job = dict(job)
    if worker_id is not None and run["worker_id"] != worker_id:
        raise Fenced(f"Run {run_id} belongs to another worker.")
    if run["status"] != "in_progress" or job["current_run_id"] != run_id:
        raise Fenced(
            f"Run {run_id} is {run['status']}; it is no longer the live run of job {job['id']!r}. Stop it."
        )
    if check_lease and run["lease_expires_at"] is not None and run["lease_expires_at"] < now:
        raise Fenced(f"Run {run_id} lost its lease; its job will be retried. Stop it.")
    return run, job


def heartbeat(
    conn: Connection, org_id: str, run_id: int, now: float, lease_s: float, worker_id: str | None
) -> tuple[float, bool]:
    run, job = live_run(conn, org_id, run_id, now, worker_id=worker_id)
    lease = now + lease_s
    conn.execute(update(R).where(R.c.id == run_id).values(lease_expires_at=lease))
    if run["worker_id"]:
        touch_worker(conn, run["worker_id"], now)
    return lease, job["status"] == "canceled"


def append_log(
    conn: Connection,
    org_id: str,
    run_id: int,
    offset: int,
    data: bytes,
    now: float,
    worker_id: str | None,
) -> int:
    run, _ = live_run(conn, org_id, run_id, now, worker_id=worker_id)
    size = run["log_size"]
    if offset > size:
        raise Conflict(
            f"Log of run {run_id} has {size} bytes; a chunk at offset {offset} would leave a gap."
        )
    data = data[size - offset :]  # a resent chunk only adds what is new
    if data:
        conn.execute(insert(s.log_chunks).values(run_id=run_id, offset=size, data=data))
        size += len(data)
        conn.execute(update(R).where(R.c.id == run_id).values(log_size=size))
    return size


def read_log_chunks(conn: Connection, run_id: int, offset: int) -> list[tuple[int, bytes]]:
    q = (
        select(s.log_chunks.c.offset, s.log_chunks.c.data)
        .where(s.log_chunks.c.run_id == run_id)
        .order_by(s.log_chunks.c.offset)
    )
    # start from the chunk that holds `offset`
    start = conn.execute(
        select(func.max(s.log_chunks.c.offset)).where(
            s.log_chunks.c.run_id == run_id, s.log_chunks.c.offset <= offset
        )
    ).scalar()
    if start is not None:
        q = q.where(s.log_chunks.c.offset >= start)
    out = []
    for off, data in conn.execute(q):
        data = bytes(data)
        if off < offset:
            data = data[offset - off :]
            off = offset
        out.append((off, data))
    return out


def finish_run(
    conn: Connection,
    run: dict,
    job: dict,
    *,
    status: str,
    now: float,
    exit_code: int | None = None,
    error: str | None = None,
    log_file: str | None = None,
) -> dict:
    """End a live run and move its job on. `status` is the run's: completed, failed, canceled or lost."""
    run_values = {
        "status": status,
        "finished_at": now,
        "exit_code": exit_code,
        "error": error,
        "lease_expires_at": None,
        "log_file": log_file,
    }
    conn.execute(update(R).where(R.c.id == run["id"]).values(**run_values))
    run.update(run_values)
    if run["worker_id"]:
        conn.execute(
            update(W)
            .where(W.c.id == run["worker_id"], W.c.current_run_id == run["id"])
            .values(current_run_id=None)
        )
    orgs.revoke_run_tokens(conn, run["id"], now)
    if job["current_run_id"] != run["id"]:
        return run
    values: dict[str, Any] = {"updated_at": now}
    if job["status"] == "canceled":
        pass  # the user canceled it: it stays canceled whatever the run did
    elif status == "completed":
        values.update(
            status="completed", outputs=merged_outputs(conn, run["id"]), finished_at=now, error=None
        )
    elif status == "failed":
        values.update(status="failed", finished_at=now, error=error or f"exit code {exit_code}")
    elif status == "canceled":
        values.update(status="failed", finished_at=now, error=error or "canceled by its worker")
    elif status == "lost":
        if job["attempts"] < job["max_attempts"]:
            values.update(status="pending", current_run_id=None, worker_id=None)
        else:
            values.update(
                status="failed",
                finished_at=now,
                error=f"failed after {job['attempts']} attempt(s); the last was lost: {error}",
            )
    conn.execute(update(J).where(J.c.pk == job["pk"]).values(**values))
    job.update(values)
    return run


def merged_outputs(conn: Connection, run_id: int) -> dict:
    out: dict[str, Any] = {}
    for (data,) in conn.execute(select(E.c.data).where(E.c.run_id == run_id).order_by(E.c.id)):
        if isinstance(data, dict):
            out.update({k: v for k, v in data.items() if v is not None})
    return out


def expired_runs(conn: Connection, now: float, limit: int = 500) -> list[int]:
    q = select(R.c.id).where(R.c.status == "in_progress", R.c.lease_expires_at < now).limit(limit)
    return [r[0] for r in conn.execute(q)]


def lose_run(conn: Connection, run_id: int, now: float, reason: str) -> dict | None:
    """Mark one in-progress run lost (lease lapsed) and requeue or fail its job."""
    run = (
        conn.execute(
            select(R, J.c.id.label("job_id"))
            .join(J, J.c.pk == R.c.job_pk)
            .where(R.c.id == run_id)
            .with_for_update(of=R)
        )
        .mappings()
        .first()
    )
    if run is None or run["status"] != "in_progress":
        return None
    run = dict(run)
    job = dict(
        conn.execute(select(J).where(J.c.pk == run["job_pk"]).with_for_update()).mappings().one()
    )
    finish_run(conn, run, job, status="lost", now=now, error=reason)
    return job


# -- events ----------------------------------------------------------------------------------


def add_events(conn: Connection, run: dict, events: list[Any], now: float) -> int:
    rows = [
        {
            "org_id": run["org_id"],
            "run_id": run["id"],
            "job_pk": run["job_pk"],
            "data": e.data,
            "file": e.file,
            "created_at": now,
        }
        for e in events
    ]
    conn.execute(insert(E), rows)
    return len(rows)


def list_events(
    conn: Connection,
    org_id: str,
    *,
    job_id: str | None,
    run_id: int | None,
    after: int | None,
    limit: int,
) -> tuple[list[dict], bool]:
    q = select(E, J.c.id.label("job_id")).join(J, J.c.pk == E.c.job_pk).where(E.c.org_id == org_id)
    if run_id is not None:
        get_run(conn, org_id, run_id)
        q = q.where(E.c.run_id == run_id)
    elif job_id is not None:
        job = get_job(conn, org_id, job_id)
        q = q.where(E.c.job_pk == job["pk"])
    else:
        raise Invalid("Give job_id or run_id.", param="job_id")
    if after is not None:
        q = q.where(E.c.id > after)
    rows = [dict(r) for r in conn.execute(q.order_by(E.c.id).limit(limit + 1)).mappings()]
    return rows[:limit], len(rows) > limit


def delete_log_chunks(conn: Connection, run_id: int) -> None:
    conn.execute(delete(s.log_chunks).where(s.log_chunks.c.run_id == run_id))


def grace_live_leases(conn: Connection, now: float, lease_s: float) -> int:
    """At server start: workers could not heartbeat while the server was down, so no live run
    may be declared lost before they had one full lease to reach it again."""
    return conn.execute(
        update(R)
        .where(R.c.status == "in_progress", R.c.lease_expires_at < now + lease_s)
        .values(lease_expires_at=now + lease_s)
    ).rowcount
