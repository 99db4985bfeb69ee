"""What the cluster manager reads and writes: the queue as it sees it, the manager lease, and
losing a dead worker's runs at once.

The manager lease is a row of `workers` (`id = "cm-<org>"`, provider `cluster-manager`, status
`shutdown`, so it never claims and never counts as a live worker): `name` is the holder and
`last_seen_at` the lease's expiry. It needs no table of its own; a dedicated `cluster_leases`
table would be cleaner (see docs/cluster.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from openweights.store import jobs as q
from openweights.store import schema as s
from openweights.store.errors import NotFound

__all__ = [
    "LEASE_PROVIDER",
    "LeaseRace",
    "PodRace",
    "acquire_lease",
    "lease_id",
    "list_pods",
    "boot_times",
    "list_pods_row",
    "list_waits",
    "lose_worker",
    "record_pod",
    "release_lease",
    "run_costs",
    "set_waits",
    "snapshot",
    "wait_reason",
]

J, R, W = s.jobs, s.runs, s.workers
P, WT = s.cluster_pods, s.cluster_waits
LEASE_PROVIDER = "cluster-manager"
#: Workers that stopped longer ago than this are left out of the manager's view.
RECENT_S = 3600.0


class LeaseRace(Exception):
    """Two managers created the lease row at once: read it again in a new transaction."""


class PodRace(Exception):
    """Two calls created the same pod row at once: record it again in a new transaction."""


def lease_id(org_id: str) -> str:
    return f"cm-{org_id}"[:64]


def snapshot(conn: Connection, org_id: str, now: float, *, limit: int = 2000) -> dict[str, Any]:
    """Pending jobs (oldest first, what sizing needs), recent workers and when each went idle.

    `version` changes whenever something the manager acts on changes (not on heartbeats)."""
    pending = [
        dict(r)
        for r in conn.execute(
            select(
                J.c.id,
                J.c.requires_vram_gb,
                J.c.allowed_hardware,
                J.c.docker_image,
                J.c.model,
                J.c.queued_at,
            )
            .where(J.c.org_id == org_id, J.c.status == "pending")
            .order_by(J.c.queued_at)
            .limit(limit)
        ).mappings()
    ]
    pending_total = conn.execute(
        select(func.count()).select_from(J).where(J.c.org_id == org_id, J.c.status == "pending")
    ).scalar_one()
    workers = [
        dict(r)
        for r in conn.execute(
            select(
                W.c.id,
                W.c.name,
                W.c.status,
                W.c.hardware_type,
                W.c.vram_gb,
                W.c.docker_image,
                W.c.any_hardware,
                W.c.cached_models,
                W.c.provider,
                W.c.current_run_id,
                W.c.last_seen_at,
                W.c.created_at,
            )
            .where(
                W.c.org_id == org_id,
                W.c.provider != LEASE_PROVIDER,
                or_(W.c.status == "active", W.c.last_seen_at >= now - RECENT_S),
            )
            .order_by(W.c.created_at)
        ).mappings()
    ]
    ids = [w["id"] for w in workers]
    last_end: dict[str, float] = {}
    if ids:
        for wid, end in conn.execute(
            select(R.c.worker_id, func.max(R.c.finished_at))
            .where(R.c.org_id == org_id, R.c.worker_id.in_(ids))
            .group_by(R.c.worker_id)
        ):
            if end is not None:
                last_end[wid] = end
    for w in workers:
        w["idle_since"] = max(last_end.get(w["id"], 0.0), w["created_at"])
        w["cached_models"] = w["cached_models"] or []
    stable = {
        "p": [(j["id"], j["queued_at"]) for j in pending],
        "w": [(w["id"], w["status"], w["current_run_id"], w["idle_since"]) for w in workers],
    }
    version = hashlib.sha256(json.dumps(stable, default=str).encode()).hexdigest()[:16]
    return {
        "version": version,
        "now": now,
        "pending": pending,
        "pending_total": pending_total,
        "workers": workers,
    }


def acquire_lease(
    conn: Connection, org_id: str, holder: str, ttl_s: float, now: float
) -> dict[str, Any]:
    """Take or renew the org's manager lease for `holder`; `held` says whether it got it."""
    lid = lease_id(org_id)
    row = conn.execute(select(W.c.name, W.c.last_seen_at).where(W.c.id == lid)).first()
    if row is None:
        try:
            conn.execute(
                insert(W).values(
                    id=lid,
                    org_id=org_id,
                    name=holder,
                    status="shutdown",
                    hardware={},
                    hardware_type="manager",
                    vram_gb=0.0,
                    docker_image=None,
                    any_hardware=False,
                    cached_models=[],
                    provider=LEASE_PROVIDER,
                    token_id=None,
                    current_run_id=None,
                    last_seen_at=now + ttl_s,
                    created_at=now,
                )
            )
        except IntegrityError as e:
            raise LeaseRace() from e
        return {"held": True, "holder": holder, "expires_at": now + ttl_s}
    got = conn.execute(
        update(W)
        .where(W.c.id == lid, or_(W.c.name == holder, W.c.last_seen_at < now))
        .values(name=holder, last_seen_at=now + ttl_s)
    ).rowcount
    if got:
        return {"held": True, "holder": holder, "expires_at": now + ttl_s}
    return {"held": False, "holder": row[0], "expires_at": row[1]}


def release_lease(conn: Connection, org_id: str, holder: str, now: float) -> bool:
    """Give the lease up (a stopping manager), so a standby takes over at once."""
    return bool(
        conn.execute(
            update(W)
            .where(W.c.id == lease_id(org_id), W.c.name == holder)
            .values(last_seen_at=now - 1)
        ).rowcount
    )


def lose_worker(
    conn: Connection, org_id: str, worker_id: str, now: float, reason: str
) -> list[dict[str, Any]]:
    """A worker whose pod is gone: shut it down and end its live runs as `lost` now (their jobs
    are requeued, or failed after `max_attempts`) instead of waiting for their leases."""
    worker = conn.execute(select(W).where(W.c.id == worker_id, W.c.org_id == org_id)).first()
    if worker is None or worker.provider == LEASE_PROVIDER:
        raise NotFound(f"Worker {worker_id!r} not found.", param="worker_id")
    conn.execute(update(W).where(W.c.id == worker_id).values(status="shutdown"))
    jobs = []
    run_ids = [
        r[0]
        for r in conn.execute(
            select(R.c.id).where(
                and_(R.c.worker_id == worker_id, R.c.org_id == org_id, R.c.status == "in_progress")
            )
        )
    ]
    for run_id in run_ids:
        run, job = q.lock_run(conn, org_id, run_id)
        if run["status"] != "in_progress":
            continue
        q.finish_run(conn, run, job, status="lost", now=now, error=reason)
        jobs.append({"id": job["id"], "status": job["status"], "run_id": run_id})
    return jobs


def run_costs(
    conn: Connection,
    org_id: str,
    price_of: Callable[[str], float],
    *,
    since: float | None = None,
    job_id: str | None = None,
    now: float,
) -> list[dict[str, Any]]:
    """Runs with their hardware, provider, start/end and cost (busy time × hourly price).

    `price_of`: USD per hour of a hardware_type (`"2x A100"`); a local worker costs nothing."""
    query = (
        select(
            R.c.id,
            J.c.id.label("job_id"),
            R.c.status,
            R.c.started_at,
            R.c.finished_at,
            func.coalesce(R.c.hardware, W.c.hardware_type).label("hardware_type"),
            W.c.provider,
            P.c.price_per_hour.label("pod_price"),
            P.c.pod_id,
        )
        .join(J, J.c.pk == R.c.job_pk)
        .outerjoin(W, W.c.id == R.c.worker_id)
        # the price its pod was launched at, as recorded by the manager (`cluster_pods`)
        .outerjoin(P, and_(P.c.org_id == R.c.org_id, P.c.name == W.c.name))
        .where(R.c.org_id == org_id)
        .order_by(R.c.id)
    )
    if since is not None:
        query = query.where(or_(R.c.finished_at.is_(None), R.c.finished_at >= since))
    if job_id is not None:
        query = query.where(J.c.id == job_id)
    out = []
    for r in conn.execute(query).mappings():
        end = r["finished_at"] if r["finished_at"] is not None else now
        provider = r["provider"] or "unknown"
        if r["pod_price"] is not None:
            price = r["pod_price"]
        else:
            price = 0.0 if provider == "local" else price_of(r["hardware_type"] or "")
        hours = max(0.0, end - r["started_at"]) / 3600
        out.append(
            {
                "run_id": r["id"],
                "job_id": r["job_id"],
                "status": r["status"],
                "hardware_type": r["hardware_type"],
                "provider": provider,
                "started_at": r["started_at"],
                "finished_at": r["finished_at"],
                "price_per_hour": price,
                "cost_usd": round(price * hours, 6),
                "pod_id": r["pod_id"],
            }
        )
    return out


def managed_orgs(conn: Connection, decrypt: Callable[[bytes], str]) -> dict[str, dict[str, str]]:
    """Orgs whose secret OW_MANAGED is true, with their cluster secrets (`ow manage start`)."""
    from openweights.types.cluster import CLUSTER_SECRET_NAMES

    flagged = [
        org_id
        for org_id, enc in conn.execute(
            select(s.secrets.c.org_id, s.secrets.c.value_encrypted).where(
                s.secrets.c.name == "OW_MANAGED"
            )
        )
        if decrypt(enc).strip().lower() in {"1", "true", "yes"}
    ]
    out: dict[str, dict[str, str]] = {org_id: {} for org_id in flagged}
    if flagged:
        for org_id, name, enc in conn.execute(
            select(s.secrets.c.org_id, s.secrets.c.name, s.secrets.c.value_encrypted).where(
                s.secrets.c.org_id.in_(flagged), s.secrets.c.name.in_(CLUSTER_SECRET_NAMES)
            )
        ):
            out[org_id][name] = decrypt(enc)
    return out


# -- pods (billed time) ------------------------------------------------------------------------

_POD_FIXED = ("name", "hardware_type", "image")
_POD_FILL = ("token_id", "job_id", "worker_id", "registered_at")


def record_pod(conn: Connection, org_id: str, rec: dict[str, Any], now: float) -> dict[str, Any]:
    """Create or complete the row of one pod (keyed by provider + pod id).

    Fields already set stay (a late or repeated call never rewrites history), except the price
    (the provider's own figure replaces the catalog's) and `launched_at` (the earliest wins).
    `terminated=True` sets `terminated_at` to now and the reason, once."""
    key = and_(P.c.org_id == org_id, P.c.provider == rec["provider"], P.c.pod_id == rec["pod_id"])
    row = conn.execute(select(P).where(key)).mappings().first()
    launched = now if rec.get("launched_at") is None else rec["launched_at"]
    if row is None:
        values = {
            "org_id": org_id,
            "provider": rec["provider"],
            "pod_id": rec["pod_id"],
            "name": rec["name"],
            "hardware_type": rec["hardware_type"],
            "price_per_hour": rec["price_per_hour"],
            "image": rec.get("image"),
            **{k: rec.get(k) for k in _POD_FILL},
            "launched_at": launched,
            "terminated_at": now if rec.get("terminated") else None,
            "termination_reason": rec.get("termination_reason") if rec.get("terminated") else None,
        }
        try:
            conn.execute(insert(P).values(**values))
        except IntegrityError as e:
            raise PodRace() from e
        return values
    values: dict[str, Any] = {}
    for k in _POD_FILL:
        if row[k] is None and rec.get(k) is not None:
            values[k] = rec[k]
    if rec.get("price_per_hour") is not None and row["terminated_at"] is None:
        values["price_per_hour"] = rec["price_per_hour"]
    if launched < row["launched_at"]:
        values["launched_at"] = launched
    if rec.get("terminated") and row["terminated_at"] is None:
        values["terminated_at"] = now
        values["termination_reason"] = rec.get("termination_reason")
    if values:
        conn.execute(update(P).where(key).values(**values))
    return {**dict(row), **values}


def list_pods(
    conn: Connection,
    org_id: str,
    *,
    now: float,
    since: float | None = None,
    running: bool | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Pods newest first, each with its billed seconds and cost (launch to termination, or to
    now while it runs; from `since` when given)."""
    query = select(P).where(P.c.org_id == org_id).order_by(P.c.launched_at.desc()).limit(limit)
    if since is not None:
        query = query.where(or_(P.c.terminated_at.is_(None), P.c.terminated_at >= since))
    if running is True:
        query = query.where(P.c.terminated_at.is_(None))
    elif running is False:
        query = query.where(P.c.terminated_at.is_not(None))
    return [list_pods_row(dict(r), now, since) for r in conn.execute(query).mappings()]


def list_pods_row(row: dict[str, Any], now: float, since: float | None = None) -> dict[str, Any]:
    """A pod row with its billed seconds and cost."""
    start = max(row["launched_at"], since) if since is not None else row["launched_at"]
    end = row["terminated_at"] if row["terminated_at"] is not None else now
    billed_s = max(0.0, end - start)
    return {
        **row,
        "billed_s": round(billed_s, 3),
        "cost_usd": round(row["price_per_hour"] * billed_s / 3600, 6),
    }


# -- why jobs wait (the manager's view) -------------------------------------------------------


def set_waits(
    conn: Connection, org_id: str, reasons: dict[str, str], now: float, ttl_s: float
) -> int:
    """Replace the org's wait reasons with `reasons` (job id -> why), valid for `ttl_s`."""
    conn.execute(WT.delete().where(WT.c.org_id == org_id))
    if reasons:
        conn.execute(
            insert(WT),
            [
                {
                    "org_id": org_id,
                    "job_id": job_id,
                    "reason": reason[:2000],
                    "updated_at": now,
                    "expires_at": now + ttl_s,
                }
                for job_id, reason in reasons.items()
            ],
        )
    return len(reasons)


def list_waits(conn: Connection, org_id: str, now: float) -> dict[str, str]:
    """The org's fresh wait reasons, job id -> reason."""
    rows = conn.execute(
        select(WT.c.job_id, WT.c.reason).where(WT.c.org_id == org_id, WT.c.expires_at >= now)
    )
    return {job_id: reason for job_id, reason in rows}


_WAIT_REASON = (
    select(WT.c.reason)
    .where(
        WT.c.org_id == bindparam("org_id"),
        WT.c.job_id == bindparam("job_id"),
        WT.c.expires_at >= bindparam("now"),
    )
    .limit(1)
)


def wait_reason(conn: Connection, org_id: str, job_id: str, now: float) -> str | None:
    """The live manager's reason this job waits, if it gave one (primary-key lookup)."""
    return conn.execute(
        _WAIT_REASON, {"org_id": org_id, "job_id": job_id, "now": now}
    ).scalar_one_or_none()


def boot_times(
    conn: Connection, org_id: str, hardware_type: str, *, limit: int = 20
) -> list[float]:
    """Launch-to-registration seconds of the org's latest pods of this hardware (estimates)."""
    rows = conn.execute(
        select(P.c.launched_at, P.c.registered_at)
        .where(
            P.c.org_id == org_id,
            P.c.hardware_type == hardware_type,
            P.c.registered_at.is_not(None),
        )
        .order_by(P.c.launched_at.desc())
        .limit(limit)
    )
    return [max(0.0, reg - launched) for launched, reg in rows]
