"""Jobs, runs, leases, logs and events: the queue.

Promise: at-least-once execution, zero lost jobs, at most one accepted completion per job.
Every worker call names its run; only the job's live run (`jobs.current_run_id`) is heard
(fencing). Lease times come from `Database.now`, never from a worker's clock.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, func, insert, or_, select, update

from openweights.store import orgs
from openweights.store import schema as s
from openweights.store.errors import Conflict, Fenced, Forbidden, Invalid, NotFound
from openweights.store.orgs import Principal
from openweights.store.queries import QUERIES, query

TERMINAL = ("completed", "failed", "canceled")
#: a pending reason counts the jobs ahead up to this many (beyond it: "over N"), so that its
#: cost, paid on every create, does not grow with the queue
AHEAD_CAP = 1000
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


def fill_placeholders(params: dict, *, job_id: str, org_name: Callable[[], str]) -> dict:
    """`{job_id}` and `{org_id}` in top-level string values of `params.validated_params` become
    the job's id and the org's name as a namespace (e.g. `finetuned_model_id`; characters a
    model id cannot hold become `-`). The id is hashed from the
    params before this, so resubmitting the same template finds the same job."""
    vp = params.get("validated_params")
    if not isinstance(vp, dict):
        return params
    if not any(isinstance(v, str) and ("{job_id}" in v or "{org_id}" in v) for v in vp.values()):
        return params
    # the org's name as a model-id namespace: "alignment lab" -> "alignment-lab"
    named = any(isinstance(v, str) and "{org_id}" in v for v in vp.values())
    org = (re.sub(r"[^A-Za-z0-9_.\-]+", "-", org_name()).strip("-._") or "org") if named else ""
    filled = {
        k: v.replace("{job_id}", job_id).replace("{org_id}", org) if isinstance(v, str) else v
        for k, v in vp.items()
    }
    return {**params, "validated_params": filled}


def _org_name(conn: Connection, org_id: str) -> str:
    return conn.execute(select(s.orgs.c.name).where(s.orgs.c.id == org_id)).scalar_one()


def _new_row(
    org_id: str, req: Any, now: float, default_max_attempts: int, org_name: Callable[[], str]
) -> tuple[dict, dict]:
    """The row of a new pending job, and its requirements (what a resubmit updates)."""
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
    params = fill_placeholders(req.params, job_id=jid, org_name=org_name)
    requirements = {
        "requires_vram_gb": req.requires_vram_gb,
        "allowed_hardware": req.allowed_hardware,
        "docker_image": req.docker_image,
        "timeout_s": req.timeout_s,
        "model": req.model,
    }
    if req.max_attempts is not None:
        requirements["max_attempts"] = req.max_attempts
    row = {
        "org_id": org_id,
        "id": jid,
        "type": req.type,
        "status": "pending",
        "params": params,
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
    return row, requirements


class _NeedsTransaction(Exception):
    pass


def _no_org_name() -> str:
    raise _NeedsTransaction


def create_new_job_once(
    raw: Any,
    org_id: str,
    req: Any,
    now: float,
    default_max_attempts: int,
    offline_s: float,
    notify: Callable[[str], tuple[str, list[str]]],
) -> tuple[dict, str] | None:
    """PostgreSQL (`queries.RawDatabase`), the common case of `create_job` — a new job — in one
    round trip: the insert with the NOTIFY of `notify(job_id)` (channel, keys) in one statement,
    then what its pending reason needs. Returns (row, pending reason); None when the transaction
    path must answer (a resubmit of an existing id, where nothing was written; params that need
    the org's name)."""
    try:
        row, _ = _new_row(org_id, req, now, default_max_attempts, _no_org_name)
    except _NeedsTransaction:
        return None
    channel, keys = notify(row["id"])
    inserted, inputs = raw.once(
        (QUERIES[("insert_job_notify", "postgresql")],
         {**row, "now": now, "channel": channel, "keys": keys}),
        (QUERIES[("pending_inputs", "postgresql")],
         {"org_id": org_id, "job_id": row["id"], "now": now, "since": now - offline_s,
          "queued_at": now, "cap": AHEAD_CAP + 1}),
    )  # fmt: skip
    if inserted is None:
        return None
    row["pk"] = inserted[0]
    manager, live, ahead = inputs
    return row, _reason(row, manager, json.loads(live), lambda: ahead)


def create_job(
    conn: Connection, org_id: str, req: Any, now: float, default_max_attempts: int, *, lock: bool
) -> tuple[dict, bool]:
    """Insert, requeue (failed/canceled) or return the existing job. Returns (row, queued)."""
    row, requirements = _new_row(
        org_id, req, now, default_max_attempts, lambda: _org_name(conn, org_id)
    )
    jid = row["id"]
    # A new job is one statement; an existing id (a resubmit) is rare and takes the slow path.
    pk = conn.execute(query(conn, "insert_job"), {**row, "now": now}).scalar()
    if pk is not None:
        row["pk"] = pk
        return row, True
    existing = _job_row(conn, org_id, jid, lock=lock)
    if existing is None:  # cannot happen: the insert conflicted with it in this transaction
        raise Conflict(f"Job {jid!r} was deleted while it was resubmitted; submit it again.")
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
    id_prefix: str | None = None,
) -> tuple[list[dict], bool]:
    q = select(J).where(J.c.org_id == org_id)
    if status:
        q = q.where(J.c.status == status)
    if type:
        q = q.where(J.c.type == type)
    if id_prefix:
        q = q.where(J.c.id.startswith(f"{id_prefix}-", autoescape=True))  # `_` is literal
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
    id_prefix: str | None = None,
) -> list[dict]:
    """Jobs whose `params.validated_params` contain `params` (as jsonb `@>`), newest first."""
    q = select(J).where(J.c.org_id == org_id)
    if type:
        q = q.where(J.c.type == type)
    if status:
        q = q.where(J.c.status == status)
    if id_prefix:
        q = q.where(J.c.id.startswith(f"{id_prefix}-", autoescape=True))  # `_` is literal
    if dialect == "postgresql" and params:
        from sqlalchemy import type_coerce
        from sqlalchemy.dialects.postgresql import JSONB

        q = q.where(type_coerce(J.c.params, JSONB).contains({"validated_params": params}))
        q = q.order_by(J.c.created_at.desc()).limit(limit)
        return [dict(r) for r in conn.execute(q).mappings()]
    # SQLite: the scalar values are matched by SQLite's JSON functions first (a superset of the
    # matches: the exact containment is checked below), so a miss is not a JSON decode per job
    for path, value in _scalar_leaves(params, "$.validated_params"):
        q = q.where(func.json_extract(J.c.params, path) == value)
    out = []
    for r in conn.execute(q.order_by(J.c.created_at.desc())).mappings():
        vp = (r["params"] or {}).get("validated_params") or {}
        if _contains(vp, params):
            out.append(dict(r))
            if len(out) >= limit:
                break
    return out


#: a key that a JSON path names plainly inside double quotes
_PATH_KEY = re.compile(r"[^\"\\\x00-\x1f]+")


def _scalar_leaves(want: dict, path: str) -> Iterator[tuple[str, str | int | float]]:
    """(JSON path, value) of each string, number and boolean `want` holds in nested dicts, for
    `json_extract(...) = value`: a condition every job that contains `want` meets (JSON true and
    false read as 1 and 0 there: `_contains` tells them from numbers). Other values (null, lists,
    integers SQLite cannot hold) and keys a JSON path cannot name plainly are left to it."""
    for k, v in want.items():
        if not _PATH_KEY.fullmatch(k):
            continue
        if isinstance(v, dict):
            yield from _scalar_leaves(v, f'{path}."{k}"')
        elif isinstance(v, (str, int, float)) and not (isinstance(v, int) and abs(v) >= 2**63):
            yield f'{path}."{k}"', int(v) if isinstance(v, bool) else v  # bool is an int


def _contains(have: Any, want: Any) -> bool:
    """`have @> want` as PostgreSQL's jsonb has it, so both databases find the same jobs: dicts
    and lists by containment (each wanted element contained in some element), booleans never
    equal to numbers, numbers by value (1 == 1.0)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and _contains(have[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return isinstance(have, list) and all(any(_contains(h, w) for h in have) for w in want)
    if isinstance(want, bool) or isinstance(have, bool):
        return type(have) is type(want) and have == want
    if isinstance(want, (int, float)):
        return isinstance(have, (int, float)) and have == want
    return type(have) is type(want) and have == want


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
    """Why a pending job waits: the live workers' view, then the cluster manager's when one
    runs for the org (spend cap, cooldown, no hardware, a pod booting for it)."""
    org_id, since = job["org_id"], now - offline_s
    if conn.dialect.name == "postgresql":  # one round trip for all three
        row = conn.execute(
            query(conn, "pending_inputs"),
            {"org_id": org_id, "job_id": job["id"], "now": now, "since": since,
             "queued_at": job["queued_at"], "cap": AHEAD_CAP + 1},
        ).first()  # fmt: skip
        manager, live, n_ahead = row[0], json.loads(row[1]), row[2]
        ahead: Callable[[], int] = lambda: n_ahead  # noqa: E731
    else:
        manager = conn.execute(
            query(conn, "wait_reason"), {"org_id": org_id, "job_id": job["id"], "now": now}
        ).scalar()
        live = [
            dict(r)
            for r in conn.execute(
                query(conn, "live_workers"), {"org_id": org_id, "since": since}
            ).mappings()
        ]

        def ahead() -> int:
            return conn.execute(
                query(conn, "jobs_ahead"),
                {"org_id": org_id, "queued_at": job["queued_at"], "cap": AHEAD_CAP + 1},
            ).scalar_one()

    return _reason(job, manager, live, ahead)


def _reason(job: dict, manager: str | None, live: list[dict], ahead: Callable[[], int]) -> str:
    reason = _workers_reason(job, live, ahead, managed=manager is not None)
    return f"{reason} Cluster manager: {manager}." if manager else reason


def _workers_reason(
    job: dict, live: list[dict], ahead: Callable[[], int], *, managed: bool = False
) -> str:
    need = (
        f"allowed_hardware {job['allowed_hardware']}"
        if job["allowed_hardware"]
        else f"{job['requires_vram_gb']:g} GB VRAM"
    )
    if job["docker_image"]:
        need += f", image {job['docker_image']}"
    if not live and managed:
        return f"No worker is running for this organization yet (the job needs {need})."
    if not live:
        return (
            f"No worker is running for this organization (the job needs {need}). Start one with "
            "`ow worker`, or run the cluster manager (`ow cluster`) to start GPU workers."
        )
    fitting = [w for w in live if fits(job, w)]
    if not fitting:
        offer = ", ".join(sorted({f"{w['hardware_type']} ({w['vram_gb']:g} GB)" for w in live}))
        return f"No live worker fits: the job needs {need}; live workers offer {offer}."
    busy = sum(1 for w in fitting if w["current_run_id"] is not None)
    n = ahead()
    n_text = f"over {AHEAD_CAP}" if n > AHEAD_CAP else str(n)
    return (
        f"Waiting for a free worker: {busy} of {len(fitting)} fitting worker(s) busy, "
        f"{n_text} job(s) ahead."
    )


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
    conn.execute(query(conn, "touch_worker"), {"worker_id": worker_id, "now": now})


def checkin_worker(conn: Connection, org_id: str, worker_id: str, now: float) -> dict:
    """Mark a worker seen and return the fields a claim needs (`claim`, `check_worker_caller`)."""
    row = (
        conn.execute(
            query(conn, "checkin_worker"),
            {"worker_id": worker_id, "org_id": org_id, "now": now},
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"Worker {worker_id!r} not found.", param="worker_id")
    return dict(row)


def check_worker_caller(worker: dict, caller: Principal) -> None:
    """A worker token speaks only for the workers it registered."""
    if caller.kind == "worker" and worker["token_id"] != caller.token_id:
        raise Forbidden(f"Worker {worker['id']!r} was registered with another token.")


# -- claim -----------------------------------------------------------------------------------


@dataclass
class Claim:
    run: dict
    job: dict
    token: str


def claim(
    conn: Connection,
    worker: dict,
    now: float,
    lease_s: float,
    *,
    skip_locked: bool | None = None,
) -> Claim | None:
    """Atomically take the oldest pending job of the worker's org that fits it.

    `worker` needs id, org_id, status, hardware_type, vram_gb, docker_image, any_hardware and
    cached_models (`checkin_worker` or `get_worker`). The row lock is the dialect's: PostgreSQL
    skips rows another claim holds (`FOR UPDATE SKIP LOCKED`), SQLite has one writer
    (`BEGIN IMMEDIATE`); `skip_locked` is accepted for callers that still pass it.
    """
    del skip_locked  # the dialect's variant of claim_take decides
    if worker["status"] != "active":
        raise Conflict(f"Worker {worker['id']!r} is shut down; it takes no more jobs.")
    # Scan light columns without locks, then lock only the row we take: locking a whole batch
    # (FOR UPDATE SKIP LOCKED LIMIT n) would hide every other pending job from concurrent claims.
    scan = {
        "org_id": worker["org_id"],
        "any_hardware": bool(worker["any_hardware"]),
        "vram_gb": worker["vram_gb"],
        "any_image": worker["docker_image"] is None,
        "docker_image": worker["docker_image"] or "",
        "after_queued_at": -1.0,  # queued_at is an epoch time: every job is after this
        "after_pk": 0,
        "limit": 8,  # the first few usually fit; widen only when they do not
    }
    candidates_q, take_q = query(conn, "claim_candidates"), query(conn, "claim_take")
    cached = worker["cached_models"] or ()
    taken = None
    while taken is None:
        rows = conn.execute(candidates_q, scan).mappings().all()
        if not rows:
            return None
        fitting = [r for r in rows if fits(r, worker)]
        if cached:  # jobs for a model this worker has on disk first (stable: oldest first)
            fitting.sort(key=lambda r: not (r["model"] and r["model"] in cached))
        for cand in fitting:
            taken = (
                conn.execute(
                    take_q,
                    {
                        "job_pk": cand["pk"],
                        "worker_id": worker["id"],
                        "lease_expires_at": now + lease_s,
                        "now": now,
                        "hardware": worker["hardware_type"],
                    },
                )
                .mappings()
                .first()
            )
            if taken is not None:
                break
        scan["after_queued_at"], scan["after_pk"] = rows[-1]["queued_at"], rows[-1]["pk"]
        scan["limit"] = 64
    run_id, attempt = taken["run_id"], taken["run_attempt"]
    if "id" in taken:  # PostgreSQL's claim_take started the job in the same statement
        job = {k: v for k, v in taken.items() if k not in ("run_id", "run_attempt")}
    else:
        job = (
            conn.execute(
                query(conn, "claim_start_job"),
                {
                    "job_pk": cand["pk"],
                    "attempt": attempt,
                    "run_id": run_id,
                    "worker_id": worker["id"],
                    "now": now,
                },
            )
            .mappings()
            .first()
        )
    if job is None:  # cannot happen under the row lock / one writer: refuse to double-run
        raise Conflict("claim raced with another writer")
    conn.execute(
        query(conn, "worker_took_run"), {"run_id": run_id, "worker_id": worker["id"], "now": now}
    )
    _, token = orgs.create_token(
        conn,
        org_id=worker["org_id"],
        name=f"run {run_id}",
        kind="run",
        now=now,
        run_id=run_id,
    )
    run = {
        "id": run_id,
        "org_id": worker["org_id"],
        "job_pk": cand["pk"],
        "job_id": job["id"],
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
    return Claim(run=run, job=dict(job), token=token)


# -- runs ------------------------------------------------------------------------------------


def get_run(conn: Connection, org_id: str, run_id: int, *, lock: bool = False) -> dict:
    """A run with its `job_id` and `worker_token_id` (the token its worker registered with)."""
    if lock:
        return lock_run(conn, org_id, run_id)[0]
    row = (
        conn.execute(query(conn, "get_run"), {"run_id": run_id, "org_id": org_id})
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"Run {run_id} not found.", param="run_id")
    return dict(row)


def list_runs(conn: Connection, org_id: str, job_id: str) -> list[dict]:
    job = get_job(conn, org_id, job_id)
    q = select(R).where(R.c.job_pk == job["pk"]).order_by(R.c.id)
    return [dict(r, job_id=job_id) for r in conn.execute(q).mappings()]


_JOB_FIELDS = ("status", "current_run_id", "attempts", "max_attempts")


def lock_run(conn: Connection, org_id: str, run_id: int) -> tuple[dict, dict]:
    """The run and what fencing needs of its job, both locked until the transaction ends (one
    statement). The job dict has pk, id, org_id, status, current_run_id, attempts, max_attempts."""
    row = (
        conn.execute(query(conn, "lock_run"), {"run_id": run_id, "org_id": org_id})
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"Run {run_id} not found.", param="run_id")
    run = dict(row)
    job = {"pk": run["job_pk"], "id": run["job_id"], "org_id": run["org_id"]}
    for f in _JOB_FIELDS:
        job[f] = run.pop(f"job_{f}")
    return run, job


def check_run_caller(run: dict, caller: Principal | None) -> None:
    """Workers speak only for their own runs; a job's token only for its own run."""
    if caller is None:
        return
    if caller.kind == "run" and caller.run_id != run["id"]:
        raise Forbidden("A job's token may only write to its own run.")
    if caller.kind == "worker" and run["worker_id"] and run["worker_token_id"] != caller.token_id:
        raise Forbidden(f"Worker {run['worker_id']!r} was registered with another token.")


def check_live(
    run: dict, job: dict, now: float, *, worker_id: str | None = None, check_lease: bool = True
) -> None:
    """Raise Fenced unless `run` is still its job's live run (and, by default, holds its lease)."""
    run_id = run["id"]
    if worker_id is not None and run["worker_id"] != worker_id:
        raise Fenced(f"Run {run_id} belongs to another worker.")
    if run["status"] != "in_progress" or job["current_run_id"] != run_id:
        raise Fenced(
            f"Run {run_id} is {run['status']}; it is no longer the live run of job {job['id']!r}. Stop it."
        )
    if check_lease and run["lease_expires_at"] is not None and run["lease_expires_at"] < now:
        raise Fenced(f"Run {run_id} lost its lease; its job will be retried. Stop it.")


def live_run(
    conn: Connection,
    org_id: str,
    run_id: int,
    now: float,
    *,
    worker_id: str | None = None,
    check_lease: bool = True,
    caller: Principal | None = None,
) -> tuple[dict, dict]:
    """The run and its job (locked), if `caller` may speak for the run and it is still the
    job's live run; else raise NotFound, Forbidden or Fenced, in that order."""
    run, job = lock_run(conn, org_id, run_id)
    check_run_caller(run, caller)
    check_live(run, job, now, worker_id=worker_id, check_lease=check_lease)
    return run, job


def heartbeat(
    conn: Connection,
    org_id: str,
    run_id: int,
    now: float,
    lease_s: float,
    worker_id: str | None,
    *,
    caller: Principal | None = None,
) -> tuple[float, bool]:
    """Renew the live run's lease from `now`; returns (lease_expires_at, job canceled)."""
    lease = now + lease_s
    row = (
        conn.execute(
            query(conn, "renew_lease"),
            {"run_id": run_id, "org_id": org_id, "now": now, "lease_expires_at": lease},
        )
        .mappings()
        .first()
    )
    if row is None:  # not renewed: find out why (the checks below raise) and answer precisely
        run, job = live_run(conn, org_id, run_id, now, worker_id=worker_id, caller=caller)
        conn.execute(query(conn, "renew_lease_slow"), {"run_id": run_id, "lease_expires_at": lease})
        row = {**run, "job_status": job["status"]}
    else:  # renewed; an error below rolls the renewal back with the transaction
        check_run_caller(row, caller)
        if worker_id is not None and row["worker_id"] != worker_id:
            raise Fenced(f"Run {run_id} belongs to another worker.")
    if row["worker_id"]:
        touch_worker(conn, row["worker_id"], now)
    return lease, row["job_status"] == "canceled"


def run_status(conn: Connection, org_id: str, run_id: int) -> tuple[str, str]:
    """(run status, job status)."""
    row = conn.execute(query(conn, "run_status"), {"run_id": run_id, "org_id": org_id}).first()
    if row is None:
        raise NotFound(f"Run {run_id} not found.", param="run_id")
    return row[0], row[1]


def append_log(
    conn: Connection,
    org_id: str,
    run_id: int,
    offset: int,
    data: bytes,
    now: float,
    worker_id: str | None,
    *,
    caller: Principal | None = None,
) -> int:
    run, _ = live_run(conn, org_id, run_id, now, worker_id=worker_id, caller=caller)
    size = run["log_size"]
    if offset > size:
        raise Conflict(
            f"Log of run {run_id} has {size} bytes; a chunk at offset {offset} would leave a gap."
        )
    data = data[size - offset :]  # a resent chunk only adds what is new
    if data:
        conn.execute(
            query(conn, "insert_log_chunk"), {"run_id": run_id, "offset": size, "data": data}
        )
        size += len(data)
        conn.execute(query(conn, "set_log_size"), {"run_id": run_id, "log_size": size})
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
    """End a live run and move its job on. `status` is the run's: completed, failed, canceled or lost.

    `job` needs pk, status, current_run_id, attempts and max_attempts (`live_run` gives them)."""
    run_values = {
        "status": status,
        "finished_at": now,
        "exit_code": exit_code,
        "error": error,
        "lease_expires_at": None,
        "log_file": log_file,
    }
    conn.execute(query(conn, "end_run"), {**run_values, "run_id": run["id"], "now": now})
    run.update(run_values)
    if run["worker_id"]:
        conn.execute(
            query(conn, "worker_released_run"), {"worker_id": run["worker_id"], "run_id": run["id"]}
        )
    orgs.revoke_run_tokens(conn, run["id"], now)
    if job["current_run_id"] != run["id"]:
        return run
    values: dict[str, Any] = {"updated_at": now}
    if job["status"] == "canceled":
        name = "job_touched"  # the user canceled it: it stays canceled whatever the run did
    elif status == "completed":
        name = "job_completed"
        events = _event_data(conn, run["id"])
        values.update(status="completed", outputs=_merge(events), finished_at=now, error=None)
    elif status == "lost" and job["attempts"] < job["max_attempts"]:
        name = "job_requeued"
        values.update(status="pending", current_run_id=None, worker_id=None)
    else:
        if status == "failed":
            reason = error or f"exit code {exit_code}"
        elif status == "canceled":
            reason = error or "canceled by its worker"
        elif status == "lost":
            reason = f"failed after {job['attempts']} attempt(s); the last was lost: {error}"
        else:
            raise Invalid(f"Unknown run status {status!r}.", param="status")
        name = "job_failed"
        values.update(status="failed", finished_at=now, error=reason)
    conn.execute(
        query(conn, name),
        {
            "job_pk": job["pk"],
            "now": now,
            "outputs": values.get("outputs"),
            "error": values.get("error"),
        },
    )
    if name == "job_completed" and any(d.get("type") == "model" for d in events):
        from openweights.store.models import register_from_run  # only runs that declare one

        register_from_run(conn, run["org_id"], job["id"], run["id"], now)
    job.update(values)
    return run


def merged_outputs(conn: Connection, run_id: int) -> dict:
    return _merge(_event_data(conn, run_id))


def _event_data(conn: Connection, run_id: int) -> list[dict]:
    """The `data` dicts of a run's events, oldest first."""
    rows = conn.execute(query(conn, "run_outputs"), {"run_id": run_id})
    return [data for (data,) in rows if isinstance(data, dict)]


def _merge(events: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for data in events:
        out.update({k: v for k, v in data.items() if v is not None})
    return out


def expired_runs(conn: Connection, now: float, limit: int = 500) -> list[int]:
    q = select(R.c.id).where(R.c.status == "in_progress", R.c.lease_expires_at < now).limit(limit)
    return [r[0] for r in conn.execute(q)]


def lose_run(conn: Connection, run_id: int, now: float, reason: str) -> dict | None:
    """Mark one in-progress run lost (lease lapsed) and requeue or fail its job. Nothing when
    the run ended or was renewed since the sweeper listed it."""
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
    if run["lease_expires_at"] is not None and run["lease_expires_at"] >= now:
        return None  # a heartbeat renewed it after the sweeper's read
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
            "now": now,
        }
        for e in events
    ]
    conn.execute(query(conn, "insert_event"), rows)
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
    conn.execute(query(conn, "delete_log_chunks"), {"run_id": run_id})


def grace_live_leases(conn: Connection, now: float, lease_s: float) -> int:
    """At server start: workers could not heartbeat while the server was down, so no live run
    may be declared lost before they had one full lease to reach it again."""
    return conn.execute(
        update(R)
        .where(R.c.status == "in_progress", R.c.lease_expires_at < now + lease_s)
        .values(lease_expires_at=now + lease_s)
    ).rowcount
