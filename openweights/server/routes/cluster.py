"""What the cluster manager needs of the server: the queue as a long-poll, the manager lease,
losing a dead pod's runs at once, its provider key, and cost per run. User tokens only."""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Request

from openweights.server.auth import principal, require
from openweights.server.notify import job_key, queue_key, run_key
from openweights.server.routes._errors import ERROR_RESPONSES
from openweights.store import cluster as cq
from openweights.store import jobs as q
from openweights.store.errors import Invalid
from openweights.store.orgs import Principal
from openweights.types import cluster as ct

router = APIRouter(prefix="/v1/cluster", tags=["cluster"], responses=ERROR_RESPONSES)


@router.post("/state", response_model=ct.ClusterState)
async def cluster_state(
    body: ct.ClusterStateRequest, request: Request, p: Principal = Depends(principal)
) -> ct.ClusterState:
    """Pending jobs and workers; with `version`, long-poll until the state differs from it (a
    job queued, requeued, claimed or ended, a worker registered or stopped) or `wait_s` passed."""
    require(p, "user")
    state = request.app.state.ow
    deadline = time.monotonic() + body.wait_s

    def read():
        with state.db.read() as conn:
            if conn.dialect.name == "postgresql":
                # One snapshot for jobs and workers: a claim committing between the two reads
                # would show a job still pending *and* its worker busy, and the manager would
                # launch a second pod for it (seen in tests/test_cluster.py on PostgreSQL).
                conn.execution_options(isolation_level="REPEATABLE READ")
            return cq.snapshot(conn, p.org_id, state.db.now(conn))

    while True:
        ev = state.notifier.event(queue_key(p.org_id))  # taken before reading: no lost wake-up
        snap = await state.call(read)
        remaining = deadline - time.monotonic()
        if body.version is None or snap["version"] != body.version or remaining <= 0:
            return ct.ClusterState(**snap)
        if await request.is_disconnected():
            return ct.ClusterState(**snap)
        # Claims and registrations do not signal the queue key: the slice bounds how late the
        # manager sees those (it has nothing urgent to do about them).
        await state.notifier.wait(ev, min(remaining, 2.0))


def _retry_race(state, fn, race: type[Exception], what: str, tries: int = 3):
    """`fn(conn)` in a write transaction, again in a new one when it lost an insert `race`."""

    def work():
        for _ in range(tries):
            try:
                with state.db.write() as conn:
                    return fn(conn)
            except race:
                continue
        raise Invalid(f"Could not {what}; try again.")

    return work


@router.post("/lease", response_model=ct.LeaseObject)
async def acquire_lease(
    body: ct.LeaseRequest, request: Request, p: Principal = Depends(principal)
) -> ct.LeaseObject:
    """Take or renew the org's manager lease: one manager acts at a time, others stand by."""
    require(p, "user")
    state = request.app.state.ow

    def work(conn):
        return cq.acquire_lease(conn, p.org_id, body.holder, body.ttl_s, state.db.now(conn))

    # a race: another manager created the row first; read it in a new transaction
    row = await state.call(_retry_race(state, work, cq.LeaseRace, "take the manager lease"))
    return ct.LeaseObject(**row)


@router.post("/lease/release", response_model=ct.LeaseObject)
async def release_lease(
    body: ct.LeaseRequest, request: Request, p: Principal = Depends(principal)
) -> ct.LeaseObject:
    """Give the lease up (a manager that stops), so a standby takes over at once."""
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            now = state.db.now(conn)
            cq.release_lease(conn, p.org_id, body.holder, now)
            return now

    now = await state.call(work)
    return ct.LeaseObject(held=False, holder=body.holder, expires_at=now)


@router.post("/workers/{worker_id}/lose", response_model=ct.LoseWorkerResponse)
async def lose_worker(
    worker_id: str, body: ct.LoseWorkerRequest, request: Request, p: Principal = Depends(principal)
) -> ct.LoseWorkerResponse:
    """The worker's pod is gone: shut the worker down and requeue its jobs now."""
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            now = state.db.now(conn)
            jobs = cq.lose_worker(conn, p.org_id, worker_id, now, body.reason)
            keys = [queue_key(p.org_id), f"worker:{worker_id}"]
            for j in jobs:
                keys += [
                    job_key(p.org_id, j["id"]),
                    run_key(j["run_id"]),
                    f"auth:run:{j['run_id']}",
                ]
            state.publish(conn, *keys)
            return jobs, keys

    jobs, keys = await state.call(work)
    state.notifier.notify(*keys)
    return ct.LoseWorkerResponse(worker_id=worker_id, jobs=[ct.LostJob(**j) for j in jobs])


@router.post("/secrets", response_model=ct.ClusterSecrets)
async def cluster_secrets(
    body: ct.ClusterSecretsRequest, request: Request, p: Principal = Depends(principal)
) -> ct.ClusterSecrets:
    """Values of the org secrets the manager runs on (provider key, limits); only those names."""
    require(p, "user")
    bad = [n for n in body.names if n not in ct.CLUSTER_SECRET_NAMES]
    if bad:
        raise Invalid(
            f"Only the cluster's own secrets can be read back ({', '.join(ct.CLUSTER_SECRET_NAMES)}); "
            f"not {', '.join(bad)}.",
            param="names",
        )
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return state.org_secrets(conn, p.org_id)

    env = await state.call(work)
    return ct.ClusterSecrets(values={n: env[n] for n in body.names if n in env})


@router.get("/costs", response_model=ct.CostReport)
async def costs(
    request: Request,
    since: float | None = Query(default=None, description="Runs that ended after this epoch."),
    job_id: str | None = None,
    p: Principal = Depends(principal),
) -> ct.CostReport:
    """Cost per run, job, day and in total: busy time × the catalog price of its hardware."""
    require(p, "user")
    from openweights.cluster.catalog import DEFAULT_CATALOG

    state = request.app.state.ow

    def price_of(hardware_type: str) -> float:
        offer = DEFAULT_CATALOG.offer(hardware_type) if hardware_type else None
        return offer.price_per_hour if offer is not None else 0.0

    def work():
        with state.db.read() as conn:
            now = state.db.now(conn)
            rows = cq.run_costs(conn, p.org_id, price_of, since=since, job_id=job_id, now=now)
            pods = [] if job_id else cq.list_pods(conn, p.org_id, now=now, since=since)
            return rows, pods

    rows, pods = await state.call(work)
    billed_by_day: dict[str, float] = {}
    for pod in pods:
        day = datetime.fromtimestamp(pod["launched_at"], tz=timezone.utc).strftime("%Y-%m-%d")
        billed_by_day[day] = round(billed_by_day.get(day, 0.0) + pod["cost_usd"], 6)
    by_job: dict[str, float] = {}
    by_day: dict[str, float] = {}
    for r in rows:
        by_job[r["job_id"]] = round(by_job.get(r["job_id"], 0.0) + r["cost_usd"], 6)
        day = datetime.fromtimestamp(r["started_at"], tz=timezone.utc).strftime("%Y-%m-%d")
        by_day[day] = round(by_day.get(day, 0.0) + r["cost_usd"], 6)
    return ct.CostReport(
        runs=[ct.RunCost(**r) for r in rows],
        by_job=by_job,
        by_day=by_day,
        total_usd=round(sum(r["cost_usd"] for r in rows), 6),
        billed_usd=round(sum(pod["cost_usd"] for pod in pods), 6),
        billed_by_day=billed_by_day,
    )


@router.post("/pods", response_model=ct.ClusterPod)
async def record_pod(
    body: ct.PodRecordRequest, request: Request, p: Principal = Depends(principal)
) -> ct.ClusterPod:
    """A manager's report on one of its pods: launched, its worker registered, terminated."""
    require(p, "user")
    state = request.app.state.ow

    def work(conn):
        now = state.db.now(conn)
        return cq.list_pods_row(cq.record_pod(conn, p.org_id, body.model_dump(), now), now)

    # a race: another call recorded the pod first; complete that row in a new transaction
    return ct.ClusterPod(**await state.call(_retry_race(state, work, cq.PodRace, "record the pod")))


@router.get("/pods", response_model=ct.ClusterPodList)
async def list_pods(
    request: Request,
    since: float | None = Query(default=None, description="Pods running at or after this epoch."),
    running: bool | None = Query(default=None, description="Only running (or ended) pods."),
    limit: int = Query(default=1000, ge=1, le=10000),
    p: Principal = Depends(principal),
) -> ct.ClusterPodList:
    """The org's pods, newest first, with billed time and cost (boot and idle included)."""
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            now = state.db.now(conn)
            return cq.list_pods(conn, p.org_id, now=now, since=since, running=running, limit=limit)

    pods = await state.call(work)
    return ct.ClusterPodList(
        data=[ct.ClusterPod(**pod) for pod in pods],
        billed_usd=round(sum(pod["cost_usd"] for pod in pods), 6),
    )


@router.post("/waits", response_model=ct.WaitsResponse)
async def set_waits(
    body: ct.WaitsRequest, request: Request, p: Principal = Depends(principal)
) -> ct.WaitsResponse:
    """The manager's reason each pending job waits: shown in the job's `pending_reason`."""
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            return cq.set_waits(conn, p.org_id, body.reasons, state.db.now(conn), body.ttl_s)

    return ct.WaitsResponse(count=await state.call(work))


@router.get("/waits", response_model=ct.WaitsResponse)
async def list_waits(request: Request, p: Principal = Depends(principal)) -> ct.WaitsResponse:
    """Why the org's cluster manager starts no pod for each waiting job (`ow ls`)."""
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return cq.list_waits(conn, p.org_id, state.db.now(conn))

    reasons = await state.call(work)
    return ct.WaitsResponse(count=len(reasons), reasons=reasons)


#: Typical RunPod GPU pod start to worker registration (image cached on the host: less).
TYPICAL_BOOT_S = 300.0


@router.post("/estimate", response_model=ct.Estimate)
async def estimate(
    body: ct.EstimateRequest, request: Request, p: Principal = Depends(principal)
) -> ct.Estimate:
    """Before `create`: which hardware a job would get, its price per hour, and the likely wait."""
    require(p, "user", "run")
    from openweights.cluster.catalog import DEFAULT_CATALOG, normalize

    state = request.app.state.ow

    def read():
        with state.db.read() as conn:
            now = state.db.now(conn)
            snap = cq.snapshot(conn, p.org_id, now)
            need = body
            ahead, manager = snap["pending_total"], None
            if body.job_id is not None:
                job = q.get_job(conn, p.org_id, body.job_id)
                need = ct.EstimateRequest(
                    requires_vram_gb=job["requires_vram_gb"] or 0,
                    allowed_hardware=job["allowed_hardware"],
                    docker_image=job["docker_image"],
                )
                ahead = sum(1 for j in snap["pending"] if j["queued_at"] < job["queued_at"])
                if job["status"] == "pending":
                    manager = cq.wait_reason(conn, p.org_id, job["id"], now)
            offers = DEFAULT_CATALOG.candidates(need.requires_vram_gb, need.allowed_hardware)
            boots = cq.boot_times(conn, p.org_id, offers[0].hardware_type) if offers else []
            return snap, need, ahead, manager, offers, boots

    snap, body, ahead, manager, offers, boots = await state.call(read)
    boot_s = statistics.median(boots) if boots else None
    allowed = {normalize(h) for h in body.allowed_hardware or []}

    def fits(w: dict) -> bool:
        if w["any_hardware"]:
            hw = True
        elif allowed:
            hw = w["hardware_type"] in allowed
        else:
            hw = body.requires_vram_gb <= w["vram_gb"]
        return hw and (w["docker_image"] is None or body.docker_image in (None, w["docker_image"]))

    live = [
        w
        for w in snap["workers"]
        if w["status"] == "active"
        and w["last_seen_at"] >= snap["now"] - state.settings.worker_offline_s
    ]
    idle = [w for w in live if fits(w) and w["current_run_id"] is None]
    busy = [w for w in live if fits(w) and w["current_run_id"] is not None]
    offer = offers[0] if offers else None
    boot = round(boot_s, 1) if boot_s is not None else TYPICAL_BOOT_S
    if idle and ahead < len(idle):
        wait, msg = 0.0, f"{len(idle)} idle worker(s) fit: it starts at once"
    elif offer is None and not busy:
        wait, msg = None, "no catalog hardware fits and no worker does: it would wait forever"
    elif offer is None:
        wait, msg = None, f"waits for one of {len(busy)} busy worker(s); no catalog hardware fits"
    else:
        wait = boot
        seen = f" (median of the last {len(boots)} such pods)" if boots else ""
        msg = (
            f"a {offer.hardware_type} pod ({offer.price_per_hour:.2f} USD/h) starts for it when a "
            f"cluster manager runs and limits allow: ~{boot:.0f}s to boot{seen}"
        )
        if busy:
            msg += f", unless one of {len(busy)} busy worker(s) frees up first"
        if ahead:
            msg += f"; {ahead} job(s) queued ahead"
    if manager:
        msg += f"; the cluster manager says: {manager}"
    return ct.Estimate(
        hardware_type=offer.hardware_type if offer else None,
        price_per_hour=offer.price_per_hour if offer else None,
        idle_workers=len(idle),
        busy_workers=len(busy),
        jobs_ahead=ahead,
        estimated_wait_s=wait,
        boot_s_observed=round(boot_s, 1) if boot_s is not None else None,
        manager_reason=manager,
        message=msg,
    )
