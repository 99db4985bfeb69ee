"""Simulate the real manager at scale: thousands of jobs, several orgs, a simulated provider and
clock (boot times, capacity outages, preemptions, prices), against the one-pod-per-job policy.

The `ClusterManager` under test is the production class: only its `http` (a simulated server
answering the same routes), its `provider` and its `clock` are simulated. Workers claim like the
server's claim (the oldest pending job of their org that fits, at once), leases lapse after
`lease_s`, preempted pods vanish with their jobs requeued.

    python -m openweights.cluster.sim --jobs 2000 --orgs 3 --seed 1
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from openweights.cluster.catalog import DEFAULT_CATALOG, Catalog, Offer, normalize
from openweights.cluster.manager import ClusterManager, ManagerConfig
from openweights.cluster.providers.base import NoCapacity, Pod, PodSpec

__all__ = ["SimResult", "Workload", "make_workload", "simulate"]

T0 = 1_800_000_000.0


# ---------------------------------------------------------------- workload


@dataclass
class SimJob:
    id: str
    org: str
    arrival: float
    duration_s: float
    requires_vram_gb: float = 0.0
    allowed_hardware: list[str] | None = None
    status: str = "pending"
    attempts: int = 0
    queued_at: float = 0.0
    first_start: float | None = None
    run_start: float | None = None
    worker: str | None = None
    run_seq: int = 0
    finished_at: float | None = None
    gpu_seconds_busy: float = 0.0


Workload = list[SimJob]


def make_workload(n_jobs: int = 2000, n_orgs: int = 3, seed: int = 1) -> Workload:
    """Bursts of mixed jobs: 60% small (24 GB, 5-20 min), 30% medium (70 GB, 20-60 min), 10%
    large (`["1x H200", "2x A100"]`, 1-3 h); a burst of 50-250 jobs every ~40 min per org."""
    rng = random.Random(seed)
    jobs: Workload = []
    t = {f"org{i}": T0 + rng.uniform(0, 600) for i in range(n_orgs)}
    i = 0
    while i < n_jobs:
        org = rng.choice(sorted(t))
        burst = min(rng.randint(50, 250), n_jobs - i)
        for _ in range(burst):
            kind = rng.random()
            at = t[org] + rng.expovariate(1 / 20.0) * (_ + 1) / 10
            if kind < 0.6:
                job = SimJob(f"j{i}", org, at, rng.uniform(300, 1200), requires_vram_gb=24)
            elif kind < 0.9:
                job = SimJob(f"j{i}", org, at, rng.uniform(1200, 3600), requires_vram_gb=70)
            else:
                job = SimJob(
                    f"j{i}",
                    org,
                    at,
                    rng.uniform(3600, 10800),
                    allowed_hardware=["1x H200", "2x A100"],
                )
            job.queued_at = at
            jobs.append(job)
            i += 1
        t[org] += rng.uniform(1200, 3600)
    return sorted(jobs, key=lambda j: j.arrival)


# ---------------------------------------------------------------- world


@dataclass
class SimPod:
    id: str
    name: str
    org: str
    offer: Offer
    launched: float
    boot_at: float
    status: str = "starting"  # starting running exited terminated
    ended: float | None = None
    worker: str | None = None
    only_job: str | None = None  # baseline: the one job this pod runs


@dataclass
class SimWorker:
    id: str
    name: str
    org: str
    pod: str
    hardware_type: str
    vram_gb: float
    created_at: float
    status: str = "active"
    alive: bool = True
    current: str | None = None  # job id
    idle_since: float = 0.0
    last_seen: float = 0.0
    only_job: str | None = None


class World:
    """The simulated server, provider and clock, shared by every org's manager."""

    def __init__(
        self,
        jobs: Workload,
        *,
        seed: int = 1,
        catalog: Catalog = DEFAULT_CATALOG,
        boot_s: tuple[float, float] = (60.0, 240.0),
        lease_s: float = 60.0,
        preempt_per_hour: float = 0.01,
        outages: dict[str, list[tuple[float, float]]] | None = None,
        capacity: dict[str, int] | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.now = T0
        self.catalog = catalog
        self.jobs = {j.id: j for j in jobs}
        self.arrivals = sorted(jobs, key=lambda j: j.arrival)
        self.pods: dict[str, SimPod] = {}
        self.workers: dict[str, SimWorker] = {}
        self.boot_s = boot_s
        self.lease_s = lease_s
        self.preempt_per_hour = preempt_per_hour
        self.outages = outages or {}
        self.capacity = capacity or {}
        self.events: list[tuple[float, int, str, str]] = []
        self._seq = 0
        self.changed: set[str] = set()  # orgs whose queue changed (wakes their manager)
        self.lost_runs = 0
        self.pod_records: list[dict[str, Any]] = []  # what managers sent to /v1/cluster/pods

    # -- events ---------------------------------------------------------------------------------
    def at(self, t: float, kind: str, ref: str) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, ref))

    def clock(self) -> float:
        return self.now

    # -- provider side --------------------------------------------------------------------------
    def launch(self, org: str, spec: PodSpec) -> Pod:
        hw = spec.offer.hardware_type
        for start, end in self.outages.get(hw, []):
            if start <= self.now - T0 < end:
                raise NoCapacity(f"no {hw} available (simulated outage)")
        running = sum(
            1 for p in self.pods.values() if p.offer.hardware_type == hw and p.ended is None
        )
        if running >= self.capacity.get(hw, 10**9):
            raise NoCapacity(f"no {hw} available (all {running} in use)")
        boot = self.now + self.rng.uniform(*self.boot_s)
        pod = SimPod(f"p{len(self.pods)}", spec.name, org, spec.offer, self.now, boot)
        self.pods[pod.id] = pod
        self.at(boot, "boot", pod.id)
        if self.preempt_per_hour > 0:
            self.at(boot + self.rng.expovariate(self.preempt_per_hour / 3600), "preempt", pod.id)
        return self._pod(pod)

    def terminate(self, pod_id: str) -> None:
        pod = self.pods.get(pod_id)
        if pod is None or pod.ended is not None:
            return
        pod.ended = self.now
        pod.status = "terminated"
        if pod.worker:
            self._kill_worker(self.workers[pod.worker])

    def _pod(self, p: SimPod) -> Pod:
        status = {"starting": "starting", "running": "running", "exited": "exited"}.get(
            p.status, "terminated"
        )
        return Pod(
            id=p.id,
            name=p.name,
            status=status,  # type: ignore[arg-type]
            hardware_type=p.offer.hardware_type,
            price_per_hour=p.offer.price_per_hour,
            created_at=p.launched,
        )

    def list_pods(self, prefix: str) -> list[Pod]:
        return [
            self._pod(p)
            for p in self.pods.values()
            if p.ended is None and p.name.startswith(prefix)
        ]

    # -- server side ----------------------------------------------------------------------------
    def _kill_worker(self, w: SimWorker) -> None:
        if not w.alive:
            return
        w.alive = False
        if w.current is not None:
            job = self.jobs[w.current]
            self.at(self.now + self.lease_s, "lease", f"{job.id}:{job.run_seq}")

    def requeue(self, job: SimJob) -> None:
        if job.status != "in_progress":
            return
        if job.run_start is not None and job.worker in self.workers:
            worker = self.workers[job.worker]
            job.gpu_seconds_busy += (self.now - job.run_start) * _gpus(worker)
            worker.current = None
        job.status, job.worker, job.run_start = "pending", None, None
        job.queued_at = self.now
        job.run_seq += 1
        self.lost_runs += 1
        self.changed.add(job.org)

    def claim_all(self) -> None:
        """Every idle live worker takes the oldest pending job of its org that fits."""
        pending: dict[str, list[SimJob]] = {}
        for j in self.jobs.values():
            if j.status == "pending" and j.arrival <= self.now:
                pending.setdefault(j.org, []).append(j)
        for js in pending.values():
            js.sort(key=lambda j: j.queued_at)
        for w in self.workers.values():
            if not (w.alive and w.status == "active" and w.current is None):
                continue
            for j in pending.get(w.org, []):
                if j.status != "pending" or not _fits(j, w):
                    continue
                if w.only_job is not None and j.id != w.only_job:
                    continue
                j.status, j.worker, j.run_start = "in_progress", w.id, self.now
                j.attempts += 1
                if j.first_start is None:
                    j.first_start = self.now
                w.current = j.id
                self.at(self.now + j.duration_s, "finish", f"{j.id}:{j.run_seq}")
                self.changed.add(w.org)
                break

    def state(self, org: str) -> dict[str, Any]:
        pending = [
            {
                "id": j.id,
                "requires_vram_gb": j.requires_vram_gb,
                "allowed_hardware": j.allowed_hardware,
                "docker_image": None,
                "model": None,
                "queued_at": j.queued_at,
            }
            for j in sorted(self.jobs.values(), key=lambda j: j.queued_at)
            if j.org == org and j.status == "pending" and j.arrival <= self.now
        ]
        workers = [
            {
                "id": w.id,
                "name": w.name,
                "status": w.status,
                "hardware_type": w.hardware_type,
                "vram_gb": w.vram_gb,
                "docker_image": None,
                "any_hardware": False,
                "cached_models": [],
                "provider": "sim",
                "current_run_id": 1 if w.current else None,
                "last_seen_at": self.now if w.alive else w.last_seen,
                "created_at": w.created_at,
                "idle_since": w.idle_since,
            }
            for w in self.workers.values()
            if w.org == org and (w.alive or w.current is not None)
        ]
        return {
            "version": str(self.now),
            "now": self.now,
            "pending": pending,
            "pending_total": len(pending),
            "workers": workers,
        }

    # -- time -----------------------------------------------------------------------------------
    def process(self, t: float) -> None:
        """Handle every event due by `t`."""
        while self.events and self.events[0][0] <= t:
            when, _, kind, ref = heapq.heappop(self.events)
            self.now = max(self.now, when)
            getattr(self, f"_on_{kind}")(ref)

    def _on_arrive(self, job_id: str) -> None:
        self.changed.add(self.jobs[job_id].org)

    def _on_boot(self, pod_id: str) -> None:
        pod = self.pods[pod_id]
        if pod.ended is not None:
            return
        pod.status = "running"
        w = SimWorker(
            id=f"w{len(self.workers)}",
            name=pod.name,
            org=pod.org,
            pod=pod.id,
            hardware_type=pod.offer.hardware_type,
            vram_gb=pod.offer.vram_gb,
            created_at=self.now,
            idle_since=self.now,
            last_seen=self.now,
            only_job=pod.only_job,
        )
        self.workers[w.id] = w
        pod.worker = w.id
        self.changed.add(pod.org)

    def _on_finish(self, ref: str) -> None:
        job_id, seq = ref.split(":")
        job = self.jobs[job_id]
        if job.status != "in_progress" or job.run_seq != int(seq):
            return
        w = self.workers[job.worker] if job.worker else None
        if w is None or not w.alive:
            return  # its worker died: the lease requeues it
        job.gpu_seconds_busy += (self.now - (job.run_start or self.now)) * _gpus(w)
        job.status, job.finished_at = "completed", self.now
        w.current, w.idle_since = None, self.now
        self.changed.add(job.org)
        if w.only_job is not None:  # baseline: the pod stops when its job ends
            w.status = "shutdown"
            self.terminate(w.pod)

    def _on_lease(self, ref: str) -> None:
        job_id, seq = ref.split(":")
        job = self.jobs[job_id]
        if job.status == "in_progress" and job.run_seq == int(seq):
            self.requeue(job)

    def _on_preempt(self, pod_id: str) -> None:
        pod = self.pods[pod_id]
        if pod.ended is not None:
            return
        pod.status = "exited"
        if pod.worker:
            self.workers[pod.worker].last_seen = self.now
            self._kill_worker(self.workers[pod.worker])

    def _on_wake(self, org: str) -> None:
        pass


def _gpus(w: SimWorker) -> int:
    return max(1, int(w.hardware_type.split("x")[0])) if "x" in w.hardware_type else 1


def _fits(job: SimJob, w: SimWorker) -> bool:
    if job.allowed_hardware:
        return w.hardware_type in {normalize(h) for h in job.allowed_hardware}
    return job.requires_vram_gb <= w.vram_gb


# ---------------------------------------------------------------- the simulated server's HTTP


class _Response:
    def __init__(self, body: Any) -> None:
        self._body = body

    def json(self) -> Any:
        return self._body


class SimHTTP:
    """The routes `ClusterManager` calls, answered from the world for one org."""

    def __init__(self, world: World, org: str) -> None:
        self.world, self.org = world, org
        self._tokens = 0

    def request(self, method: str, path: str, *, json: Any = None, **_: Any) -> _Response:
        w = self.world
        if path == "/v1/me":
            return _Response({"org": {"id": f"org-{self.org}"}})
        if path.startswith("/v1/cluster/lease"):
            return _Response({"held": True, "holder": "sim", "expires_at": w.now + 30})
        if path == "/v1/cluster/state":
            return _Response(w.state(self.org))
        if path == "/v1/tokens" and method == "POST":
            self._tokens += 1
            return _Response({"id": f"tok{self._tokens}", "token": "ow_sim"})
        if path == "/v1/tokens":
            return _Response({"data": []})
        if path.startswith("/v1/tokens/"):
            return _Response({})
        if path == "/v1/cluster/pods" and method == "GET":
            return _Response({"data": [], "billed_usd": 0.0})
        if path == "/v1/cluster/pods":
            w.pod_records.append(json)
            return _Response(json)
        if path == "/v1/cluster/waits":
            return _Response({"count": len(json["reasons"])})
        if path.endswith("/shutdown"):
            worker = w.workers[path.split("/")[3]]
            worker.status = "shutdown"
            return _Response({"current_run_id": 1 if worker.current else None})
        if path.endswith("/lose"):
            worker = w.workers[path.split("/")[4]]
            worker.status = "shutdown"
            jobs = []
            if worker.current is not None:
                job = w.jobs[worker.current]
                w.requeue(job)
                jobs.append({"id": job.id, "status": job.status, "run_id": 1})
            return _Response({"jobs": jobs})
        raise AssertionError(f"the simulated server has no route {method} {path}")


class SimProvider:
    name = "sim"
    runs_images = True

    def __init__(self, world: World, org: str) -> None:
        self.world, self.org = world, org

    def offers(self) -> list[Offer] | None:
        return None

    def launch(self, spec: PodSpec) -> Pod:
        return self.world.launch(self.org, spec)

    def status(self, pod_id: str) -> Pod | None:
        p = self.world.pods.get(pod_id)
        return None if p is None or p.ended is not None else self.world._pod(p)

    def logs(self, pod_id: str, *, tail_bytes: int = 65536) -> str:
        return ""

    def terminate(self, pod_id: str) -> None:
        self.world.terminate(pod_id)

    def list(self) -> list[Pod]:
        return self.world.list_pods("ow-")


# ---------------------------------------------------------------- policies


class OnePodPerJob:
    """The simple policy: a pod for each pending job (cheapest fitting, next on no capacity), up
    to `max_workers`; the pod runs that job only and stops when it ends."""

    def __init__(self, world: World, org: str, max_workers: int) -> None:
        self.world, self.org, self.max_workers = world, org, max_workers
        self.assigned: dict[str, str] = {}  # job -> pod

    def step(self) -> float:
        w = self.world
        live = [p for p in w.pods.values() if p.org == self.org and p.ended is None]
        for p in live:  # a preempted pod is cleaned up; its job goes back to the queue
            if p.status == "exited":
                w.terminate(p.id)
                if p.only_job:
                    self.assigned.pop(p.only_job, None)
        live = [p for p in live if p.ended is None]
        for job in sorted(w.jobs.values(), key=lambda j: j.queued_at):
            if job.org != self.org or job.status != "pending" or job.arrival > w.now:
                continue
            pod = w.pods.get(self.assigned.get(job.id, ""))
            if pod is not None and pod.ended is None:
                continue
            if len(live) >= self.max_workers:
                break
            for offer in w.catalog.candidates(job.requires_vram_gb, job.allowed_hardware):
                name = f"ow-{self.org}-{int(w.now)}-{len(w.pods)}"
                try:
                    pod_rec = w.launch(self.org, PodSpec(name, "img", offer, {}))
                except NoCapacity:
                    continue
                sim_pod = w.pods[pod_rec.id]
                sim_pod.only_job = job.id
                self.assigned[job.id] = sim_pod.id
                live.append(sim_pod)
                break
        return 60.0


# ---------------------------------------------------------------- run


@dataclass
class SimResult:
    policy: str
    jobs: int
    completed: int
    lost: int
    pods_launched: int
    pods_leaked: int
    gpu_hours_billed: float
    gpu_hours_busy: float
    utilization: float
    cost_usd: float
    wait_p50_s: float
    wait_p95_s: float
    runs_lost_to_preemption: int
    sim_hours: float
    pods_unrecorded: int = 0  # ended pods whose `cluster_pods` row would show them running
    extra: dict[str, Any] = field(default_factory=dict)


def _unrecorded(world: World) -> int:
    launched = {r["pod_id"] for r in world.pod_records}
    ended = {r["pod_id"] for r in world.pod_records if r.get("terminated")}
    return sum(
        1 for p in world.pods.values() if p.id not in launched or (p.ended and p.id not in ended)
    )


def simulate(
    jobs: Workload,
    *,
    policy: str = "manager",
    config: ManagerConfig | None = None,
    seed: int = 1,
    max_workers: int = 20,
    world_kwargs: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SimResult:
    world = World(jobs, seed=seed, **(world_kwargs or {}))
    for j in jobs:
        world.at(j.arrival, "arrive", j.id)
    orgs = sorted({j.org for j in jobs})
    config = config or ManagerConfig(max_workers=max_workers, idle_s=300, max_wait_s=60)
    actors: dict[str, Any] = {}
    for org in orgs:
        if policy == "manager":
            actors[org] = ClusterManager(
                url="http://sim",
                api_key="sim",
                provider=SimProvider(world, org),
                config=config,
                clock=world.clock,
                http=SimHTTP(world, org),  # type: ignore[arg-type]
            )
        else:
            actors[org] = OnePodPerJob(world, org, config.max_workers)
    wake = {org: T0 for org in orgs}
    end_after_idle = config.idle_s + 120
    while True:
        nxt = min([world.events[0][0]] if world.events else [math.inf])
        nxt = min(nxt, *wake.values())
        if nxt == math.inf:
            break
        world.process(nxt)
        world.now = max(world.now, nxt)
        world.claim_all()
        for org in orgs:
            if org in world.changed or wake[org] <= world.now:
                world.changed.discard(org)
                if policy == "manager":
                    state = actors[org].fetch_state()
                    delay = actors[org].step(state)
                else:
                    delay = actors[org].step()
                world.claim_all()
                wake[org] = world.now + max(delay, 1.0)
        done = all(j.status in ("completed", "failed") for j in world.jobs.values())
        if done:
            live = [p for p in world.pods.values() if p.ended is None]
            last = max((j.finished_at or 0) for j in world.jobs.values())
            if not live or world.now > last + end_after_idle + 600:
                break
    end = world.now
    billed = busy = cost = 0.0
    for p in world.pods.values():
        hours = ((p.ended or end) - p.launched) / 3600
        billed += hours * max(1, p.offer.count)
        cost += hours * p.offer.price_per_hour
    for j in world.jobs.values():
        busy += j.gpu_seconds_busy / 3600
    waits = sorted((j.first_start or end) - j.arrival for j in world.jobs.values())
    q = statistics.quantiles(waits, n=100) if len(waits) > 1 else waits * 99
    return SimResult(
        policy=policy,
        jobs=len(jobs),
        completed=sum(j.status == "completed" for j in world.jobs.values()),
        lost=sum(j.status != "completed" for j in world.jobs.values()),
        pods_launched=len(world.pods),
        pods_leaked=sum(p.ended is None for p in world.pods.values()),
        gpu_hours_billed=round(billed, 1),
        gpu_hours_busy=round(busy, 1),
        utilization=round(busy / billed, 3) if billed else 0.0,
        cost_usd=round(cost, 2),
        wait_p50_s=round(q[49], 1),
        wait_p95_s=round(q[94], 1),
        runs_lost_to_preemption=world.lost_runs,
        pods_unrecorded=_unrecorded(world) if policy == "manager" else 0,
        sim_hours=round((end - T0) / 3600, 1),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m openweights.cluster.sim",
        description="Run the real cluster manager against a simulated provider and workload, "
        "and the one-pod-per-job policy on the same trace; print both as JSON.",
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--orgs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-workers", type=int, default=20, help="per org")
    parser.add_argument("--idle-s", type=float, default=300)
    parser.add_argument("--preempt-per-hour", type=float, default=0.01)
    args = parser.parse_args(argv)
    # A100 runs out for the first 2 h; H200s are scarce throughout.
    world = {
        "preempt_per_hour": args.preempt_per_hour,
        "outages": {"1x A100": [(0, 7200)]},
        "capacity": {"1x H200": 8},
    }
    out = []
    for policy in ("manager", "one-pod-per-job"):
        jobs = make_workload(args.jobs, args.orgs, args.seed)
        config = ManagerConfig(max_workers=args.max_workers, idle_s=args.idle_s, max_wait_s=60)
        r = simulate(jobs, policy=policy, config=config, seed=args.seed, world_kwargs=world)
        out.append(r.__dict__)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
