"""The cluster manager with the `local` provider: a real server, the manager in a thread, real
`ow worker` processes as pods."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from openweights.cluster.catalog import DEFAULT_CATALOG, parse_hardware
from openweights.cluster.manager import ClusterManager, ManagerConfig
from openweights.cluster.providers.base import NoCapacity, PodSpec
from openweights.cluster.providers.local import LocalProvider
from openweights.types import Hardware
from tests.conftest import base_env, wait_until

CPU = Hardware(hardware_type="cpu", cpu_count=1, memory_gb=1.0)


def submit(server, key: str, script: str, **kw) -> dict:
    r = httpx.post(
        f"{server.url}/v1/jobs",
        json={"type": "custom", "script": script, **kw},
        headers={"Authorization": f"Bearer {key}"},
        trust_env=False,
    )
    r.raise_for_status()
    return r.json()


def get(server, key: str, path: str) -> dict:
    r = httpx.get(
        f"{server.url}{path}", headers={"Authorization": f"Bearer {key}"}, trust_env=False
    )
    r.raise_for_status()
    return r.json()


class Running:
    """Managers running in threads; stopped (and their pods terminated) at teardown."""

    def __init__(self) -> None:
        self.items: list[tuple[ClusterManager, threading.Thread]] = []

    def start(self, server, key: str, provider, **config) -> ClusterManager:
        config.setdefault("max_wait_s", 2.0)
        m = ClusterManager(
            url=server.url, api_key=key, provider=provider, config=ManagerConfig(**config)
        )
        t = threading.Thread(target=m.run, name="manager", daemon=True)
        t.start()
        self.items.append((m, t))
        return m

    def stop(self, m: ClusterManager) -> None:
        m.stop()
        for mm, t in self.items:
            if mm is m:
                t.join(60)
                assert not t.is_alive(), "manager did not stop"


@pytest.fixture
def managers():
    r = Running()
    yield r
    for m, t in r.items:
        m.stop()
        t.join(60)
    for m, _ in r.items:
        try:
            m.terminate_all("test teardown")
        except Exception:
            pass


@pytest.fixture
def local(tmp_path):
    made: list[LocalProvider] = []

    def make(max_pods: int = 2, **kw) -> LocalProvider:
        p = LocalProvider(
            tmp_path / f"pods-{len(made)}",
            hardware=kw.pop("hardware", CPU),
            max_pods=max_pods,
            base_env=base_env(tmp_path / f"worker-home-{len(made)}"),
            stop_grace_s=kw.pop("stop_grace_s", 10.0),
            **kw,
        )
        made.append(p)
        return p

    yield make
    for p in made:
        for pod in p.list():
            p.terminate(pod.id)


# -- catalog ---------------------------------------------------------------------------------


def test_catalog_picks_cheapest_fitting_single_gpu_then_falls_back():
    names = [o.hardware_type for o in DEFAULT_CATALOG.candidates(70, None)]
    assert names[0] == "1x A100"  # cheapest single card with ≥ 70 GB
    assert all(DEFAULT_CATALOG.offer(n).vram_gb >= 70 for n in names)
    assert names.index("1x H200") < names.index("2x A100")  # one card before two
    allowed = DEFAULT_CATALOG.candidates(0, ["1x H200", "2x A100", "1x H100S"])
    assert [o.hardware_type for o in allowed] == ["1x H100", "2x A100", "1x H200"]
    assert DEFAULT_CATALOG.candidates(0, None)[0].hardware_type == "cpu"
    assert DEFAULT_CATALOG.candidates(10_000, None) == []
    with pytest.raises(ValueError, match="allowed_hardware entry 'H100'"):
        parse_hardware("H100")
    assert (
        DEFAULT_CATALOG.with_prices({"A100": 9.0}).candidates(70, None)[0].hardware_type
        == "1x H100"
    )
    with pytest.raises(ValueError, match="unknown GPU types: Z80"):
        DEFAULT_CATALOG.with_prices({"Z80": 1.0})


# -- local provider --------------------------------------------------------------------------


def test_local_provider_launches_lists_and_terminates_a_real_worker(server, api_key, local):
    from openweights import OpenWeights

    ow = OpenWeights(base_url=server.url, api_key=api_key)
    token = ow.tokens.create(name="ow-t1-1-abc", kind="worker").token
    p = local(max_pods=1)
    offer = p.offers()[0]
    spec = PodSpec(
        name="ow-t1-1-abc",
        image="img",
        offer=offer,
        env={"OPENWEIGHTS_URL": server.url, "OPENWEIGHTS_API_KEY": token},
    )
    pod = p.launch(spec)
    assert pod.status == "running" and [x.name for x in p.list()] == ["ow-t1-1-abc"]
    wait_until(
        lambda: any(w.name == "ow-t1-1-abc" and w.status == "active" for w in ow.workers.list()),
        60,
        "the local worker to register",
    )
    with pytest.raises(NoCapacity, match="1 of 1"):
        p.launch(PodSpec(name="ow-t1-1-abd", image="img", offer=offer, env={}))
    with pytest.raises(NoCapacity, match="cannot run a 1x H100 pod"):
        p.launch(
            PodSpec(name="ow-t1-1-abe", image="img", offer=DEFAULT_CATALOG.offer("1x H100"), env={})
        )
    # a new provider object on the same state dir (a restarted manager) sees the same pod
    again = LocalProvider(p.state_dir, hardware=CPU, base_env={})
    assert [x.id for x in again.list()] == [pod.id]
    again.terminate(pod.id)
    assert p.list() == [] and p.status(pod.id) is None
    wait_until(
        lambda: all(w.status != "active" for w in ow.workers.list() if w.name == "ow-t1-1-abc"),
        30,
        "the worker to shut down",
    )


# -- manager ---------------------------------------------------------------------------------


def test_manager_starts_a_worker_for_a_job_then_stops_it_when_idle(
    server, api_key, local, managers
):
    p = local(max_pods=2)
    # idle_s leaves room for job2's submission on a loaded machine: a worker idle longer than
    # that is being stopped when job2 arrives, and a second pod is right then
    m = managers.start(server, api_key, p, idle_s=8.0)
    job = submit(server, api_key, "echo hello-from-pod", requires_vram_gb=0)
    done = wait_until(
        lambda: (j := get(server, api_key, f"/v1/jobs/{job['id']}"))["status"] == "completed" and j,
        90,
        "the job to complete on a pod the manager started",
    )
    assert done["worker_id"]
    workers = {w["id"]: w for w in get(server, api_key, "/v1/workers")["data"]}
    assert workers[done["worker_id"]]["name"].startswith(m.prefix)
    # a second job while the worker idles: no second pod, the same worker takes it
    job2 = submit(server, api_key, "echo again", requires_vram_gb=0)
    wait_until(
        lambda: get(server, api_key, f"/v1/jobs/{job2['id']}")["status"] == "completed", 60, "job2"
    )
    assert get(server, api_key, f"/v1/jobs/{job2['id']}")["worker_id"] == done["worker_id"]
    assert len([x for x in m.provider.list()]) == 1
    # idle for idle_s: the worker is shut down, the pod terminated, its token revoked
    wait_until(lambda: p.list() == [], 60, "the idle pod to be terminated")
    tokens = get(server, api_key, "/v1/tokens")["data"]
    pod_tokens = [t for t in tokens if t["name"].startswith(m.prefix)]
    assert pod_tokens and all(t["revoked_at"] for t in pod_tokens)


def test_manager_keeps_within_max_workers_and_a_worker_takes_further_jobs(
    server, api_key, local, managers
):
    p = local(max_pods=3)
    managers.start(server, api_key, p, idle_s=2.0, max_workers=1)
    seen: set[int] = set()
    jobs = [submit(server, api_key, f"echo {i}", requires_vram_gb=0) for i in range(3)]

    def all_done():
        seen.add(len(p.list()))
        return all(
            get(server, api_key, f"/v1/jobs/{j['id']}")["status"] == "completed" for j in jobs
        )

    wait_until(all_done, 120, "three jobs on one worker", interval_s=0.2)
    assert max(seen) == 1
    ids = {get(server, api_key, f"/v1/jobs/{j['id']}")["worker_id"] for j in jobs}
    assert len(ids) == 1
    wait_until(lambda: p.list() == [], 60, "the pod to stop after the queue drained")


def test_manager_counts_other_idle_workers_and_booting_pods_as_capacity(server, api_key, local):
    from openweights.types.cluster import ClusterState

    p = local(max_pods=3)
    m = ClusterManager(url=server.url, api_key=api_key, provider=p, config=ManagerConfig())
    now = time.time()
    job = {"id": "job-a", "requires_vram_gb": 0, "queued_at": now}
    mine = {
        "id": "worker-x",
        "name": "my-own-ow-worker",  # not a pod of ours: never stopped, but it will take job-a
        "status": "active",
        "hardware_type": "cpu",
        "vram_gb": 0,
        "provider": "local",
        "last_seen_at": now,
        "created_at": now - 600,
        "idle_since": now - 600,
    }
    state = {"version": "v", "now": now, "pending": [job], "pending_total": 1, "workers": [mine]}
    m.step(ClusterState.model_validate(state))
    assert m.last_report.launched == [] and p.list() == []
    # without it, one pod; a second step with the pod still booting launches no other
    state["workers"] = []
    m.step(ClusterState.model_validate(state))
    assert len(m.last_report.launched) == 1
    m.step(ClusterState.model_validate(state))
    assert m.last_report.launched == [] and len(p.list()) == 1


def test_one_manager_lease_per_org_under_concurrent_managers(server):
    """Eight managers of one org race for the lease at once (the row's insert race included):
    exactly one holds it, renewals keep it, others take over only on release or expiry."""
    from concurrent.futures import ThreadPoolExecutor

    key = server.signup("lease-lab")
    h = {"Authorization": f"Bearer {key}"}

    def take(holder: str, ttl_s: float = 30) -> dict:
        r = httpx.post(
            f"{server.url}/v1/cluster/lease",
            json={"holder": holder, "ttl_s": ttl_s},
            headers=h,
            trust_env=False,
        )
        r.raise_for_status()
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(take, [f"m{i}" for i in range(8)]))
    held = [g["holder"] for g in got if g["held"]]
    assert len(held) == 1
    (winner,) = held
    assert all(g["holder"] == winner for g in got)  # the others are told who holds it
    assert take(winner)["held"] and not take("m-late")["held"]
    httpx.post(
        f"{server.url}/v1/cluster/lease/release",
        json={"holder": winner},
        headers=h,
        trust_env=False,
    ).raise_for_status()
    assert take("m-next", ttl_s=1)["held"]  # at once after a release
    assert not take(winner)["held"]
    wait_until(lambda: take("m-after-expiry")["held"], 10, "the lapsed lease to be taken")
    # another org's lease is its own
    other = {"Authorization": f"Bearer {server.signup('lease-lab-2')}"}
    r = httpx.post(
        f"{server.url}/v1/cluster/lease", json={"holder": "m0"}, headers=other, trust_env=False
    )
    assert r.json()["held"]


class _Pods:
    """A provider listing fixed pods (the manager's idle policy, without starting any)."""

    name = "stub"
    runs_images = True

    def __init__(self, pods):
        self.pods = {p.id: p for p in pods}
        self.terminated: list[str] = []

    def offers(self):
        return None

    def list(self):
        return list(self.pods.values())

    def terminate(self, pod_id):
        self.terminated.append(pod_id)
        self.pods.pop(pod_id, None)

    def logs(self, pod_id, *, tail_bytes=65536):
        return ""

    def launch(self, spec):
        raise NoCapacity("the stub starts nothing")

    def status(self, pod_id):
        return self.pods.get(pod_id)


def test_manager_keeps_the_idle_worker_with_the_jobs_model_cached(server, api_key):
    from openweights.cluster.providers.base import Pod
    from openweights.types.cluster import ClusterState

    m = ClusterManager(
        url=server.url, api_key=api_key, provider=_Pods([]), config=ManagerConfig(idle_s=60)
    )
    now = time.time()
    pods = [
        Pod(f"p-{x}", f"{m.prefix}1-{x}", "running", "1x A100", 1.39, created_at=now - 900)
        for x in ("cold", "warm")
    ]
    m.provider = _Pods(pods)

    def worker(x: str, cached: list[str]) -> dict:
        return {
            "id": f"worker-{x}",
            "name": f"{m.prefix}1-{x}",
            "status": "active",
            "hardware_type": "1x A100",
            "vram_gb": 80,
            "cached_models": cached,
            "provider": "stub",
            "last_seen_at": now,
            "created_at": now - 800,
            "idle_since": now - 600,  # both idle past idle_s
        }

    job = {"id": "job-m", "requires_vram_gb": 40, "model": "org/big-model", "queued_at": now}
    state = {
        "version": "v",
        "now": now,
        "pending": [job],
        "pending_total": 1,
        "workers": [worker("cold", []), worker("warm", ["org/big-model"])],
    }
    m.step(ClusterState.model_validate(state))
    # the cold one is stopped; the warm one stays for the job (the server's claim prefers it too)
    assert m.provider.terminated == ["p-cold"]
    assert m.last_report.launched == []
