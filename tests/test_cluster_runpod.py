"""The `runpod` provider and the manager against `tests/runpod_double.py` (RunPod's GraphQL API,
locally): pods that boot run real `ow worker` processes against a real server."""

from __future__ import annotations

import httpx
import pytest

from openweights.cluster.catalog import DEFAULT_CATALOG
from openweights.cluster.providers.base import (
    NoCapacity,
    PodSpec,
    ProviderAuthError,
    ProviderUnavailable,
    QuotaExceeded,
)
from openweights.cluster.providers.runpod import RunPodProvider
from tests.conftest import wait_until
from tests.runpod_double import RunPodDouble
from tests.test_cluster import Running, get, submit


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """SQLite only: the manager is a client of the API and its logic does not depend on the
    back end; tests/test_cluster.py and the dashboard's query test run the cluster routes on
    PostgreSQL too (CI time is scarce)."""
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-cluster")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


A100 = "NVIDIA A100 80GB PCIe"
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def double(tmp_path):
    d = RunPodDouble(api_key="rp-secret", workdir=tmp_path / "pods").start()
    yield d
    d.stop()


@pytest.fixture
def managers():
    r = Running()
    yield r
    for m, t in r.items:
        m.stop()
        t.join(60)


def provider(double, **kw) -> RunPodProvider:
    return RunPodProvider("rp-secret", base_url=double.url, **kw)


def status(server, key, job_id):
    return get(server, key, f"/v1/jobs/{job_id}")


# -- provider against the double -------------------------------------------------------------


def test_runpod_provider_speaks_the_graphql_api_and_maps_its_failures(double):
    double.boot_workers = False
    p = provider(double)
    env = {"A": 'quote " and \\ backslash', "B": "line1\nline2"}
    spec = PodSpec("ow-abc-1700000000-x1", "img:1", DEFAULT_CATALOG.offer("2x A100"), env)
    pod = p.launch(spec)
    assert double.created[-1].env == env  # escaped values arrive intact
    assert double.created[-1].gpu_type_id == A100 and double.created[-1].gpu_count == 2
    listed = p.list()
    assert [(x.id, x.hardware_type, x.status) for x in listed] == [(pod.id, "2x A100", "running")]
    assert listed[0].price_per_hour == pytest.approx(2.78)
    assert listed[0].created_at == 1700000000
    cpu = p.launch(PodSpec("ow-abc-1700000001-x2", "cpu-img", DEFAULT_CATALOG.offer("cpu"), {}))
    assert p.status(cpu.id).hardware_type == "cpu"
    p.terminate(pod.id)
    p.terminate(pod.id)  # already gone: not an error
    assert p.status(pod.id) is None and [x.id for x in p.list()] == [cpu.id]

    double.no_capacity.add(A100)
    with pytest.raises(NoCapacity, match="no longer any instances"):
        p.launch(spec)
    double.low_balance = True
    with pytest.raises(QuotaExceeded, match="balance is too low"):
        p.launch(spec)
    double.low_balance = False
    double.rate_limit_next = 1
    with pytest.raises(ProviderUnavailable, match="429") as e:
        p.list()
    assert e.value.retry_after_s == 1
    double.fail_next = 1
    with pytest.raises(ProviderUnavailable, match="500"):
        p.list()
    double.hang_s = 1.0
    with pytest.raises(ProviderUnavailable, match="timed out"):
        provider(double, timeout_s=0.2).list()
    double.hang_s = 0
    with pytest.raises(ProviderAuthError, match="refused"):
        RunPodProvider("wrong", base_url=double.url).list()
    with pytest.raises(ProviderAuthError, match="RUNPOD_API_KEY is not set"):
        RunPodProvider(None, base_url=double.url)


# -- manager on RunPod -----------------------------------------------------------------------


def test_manager_picks_cheapest_allowed_hardware_retries_on_no_capacity_and_scopes_pod_env(
    server, api_key, double, managers
):
    double.no_capacity.add(A100)
    httpx.put(
        f"{server.url}/v1/secrets/HF_TOKEN",
        json={"value": "hf-secret"},
        headers={"Authorization": f"Bearer {api_key}"},
        trust_env=False,
    ).raise_for_status()
    m = managers.start(server, api_key, provider(double), idle_s=2.0)
    # 2x A100 (2.78/h) is cheapest of the allowed, but has no capacity: 1x H200 (3.59/h) next
    job = submit(server, api_key, "echo on-gpu", allowed_hardware=["1x H200", "2x A100"])
    done = wait_until(
        lambda: (j := status(server, api_key, job["id"]))["status"] == "completed" and j,
        90,
        "the job on a RunPod pod",
    )
    assert [p.gpu_type_id for p in double.created] == ["NVIDIA H200"]
    workers = {w["id"]: w for w in get(server, api_key, "/v1/workers")["data"]}
    assert workers[done["worker_id"]]["hardware"]["hardware_type"] == "1x H200"
    assert workers[done["worker_id"]]["provider"] == "runpod"
    env = double.created[0].env
    assert set(env) == {
        "OPENWEIGHTS_URL",
        "OPENWEIGHTS_API_KEY",
        "OW_WORKER_NAME",
        "OW_PROVIDER",
        "OW_DOCKER_IMAGE",
    }
    assert env["OPENWEIGHTS_API_KEY"] != api_key and "rp-secret" not in env.values()
    me = httpx.get(
        f"{server.url}/v1/me",
        headers={"Authorization": f"Bearer {env['OPENWEIGHTS_API_KEY']}"},
        trust_env=False,
    ).json()
    assert me["token"]["kind"] == "worker"
    assert env["OW_DOCKER_IMAGE"] == m.config.gpu_image
    wait_until(lambda: double.running() == [], 60, "the idle pod to be terminated")
    r = httpx.get(
        f"{server.url}/v1/me",
        headers={"Authorization": f"Bearer {env['OPENWEIGHTS_API_KEY']}"},
        trust_env=False,
    )
    assert r.status_code == 401  # the pod's token died with it


def test_pod_that_never_boots_is_replaced_and_its_hardware_backed_off(
    server, api_key, double, managers
):
    double.never_boot.add(A100)
    m = managers.start(
        server, api_key, provider(double), idle_s=1.0, boot_deadline_s=10.0, failure_threshold=1
    )
    job = submit(server, api_key, "echo booted", requires_vram_gb=70)
    wait_until(lambda: status(server, api_key, job["id"])["status"] == "completed", 90, "the job")
    kinds = [p.gpu_type_id for p in double.created]
    assert kinds[0] == A100 and kinds[-1] == H100 and A100 not in kinds[1:]
    assert not m.health.available("1x A100")
    assert status(server, api_key, job["id"])["attempts"] == 1
    wait_until(lambda: double.running() == [], 60, "no pod left")


def test_worker_dying_mid_job_requeues_it_on_a_new_pod(server, api_key, double, managers, tmp_path):
    managers.start(server, api_key, provider(double), idle_s=1.0)
    marker = tmp_path / "first-attempt"
    script = f"if [ -f {marker} ]; then echo second; else touch {marker}; sleep 120; fi"
    job = submit(server, api_key, script, allowed_hardware=["1x A40"])
    wait_until(lambda: marker.exists(), 90, "the first attempt to start")
    double.crash(double.created[0].id)
    done = wait_until(
        lambda: (j := status(server, api_key, job["id"]))["status"] == "completed" and j,
        90,
        "the requeued job to complete",
    )
    assert done["attempts"] == 2 and len(double.created) == 2
    runs = get(server, api_key, f"/v1/jobs/{job['id']}/runs")["data"]
    assert [r["status"] for r in runs] == ["lost", "completed"]
    wait_until(lambda: double.running() == [], 60, "no pod left")


def test_spend_cap_holds_launches_and_one_worker_drains_the_queue(
    server, api_key, double, managers
):
    m = managers.start(server, api_key, provider(double), idle_s=2.0, max_spend_per_hour=3.0)
    jobs = [submit(server, api_key, f"echo {i}", allowed_hardware=["1x H100"]) for i in range(3)]
    seen: set[int] = set()
    waits: list[str] = []

    def done():
        seen.add(len(double.running()))
        waits.extend(m.last_report.waiting.values())
        return all(status(server, api_key, j["id"])["status"] == "completed" for j in jobs)

    wait_until(done, 120, "three jobs under the spend cap", interval_s=0.1)
    assert max(seen) == 1 and len(double.created) == 1
    assert any("spend cap" in w and "cap 3.00 USD/h" in w for w in waits)
    wait_until(lambda: double.running() == [], 60, "no pod left")


def test_provider_rate_limits_and_5xx_only_delay_the_launch(server, api_key, double, managers):
    double.rate_limit_next = 1
    double.fail_next = 1
    managers.start(server, api_key, provider(double), idle_s=1.0)
    job = submit(server, api_key, "echo ok", allowed_hardware=["1x A40"])
    wait_until(lambda: status(server, api_key, job["id"])["status"] == "completed", 120, "job")
    assert "429" in double.requests and "500" in double.requests
    assert len(double.created) == 1
    wait_until(lambda: double.running() == [], 60, "no pod left")


def test_restarted_manager_adopts_running_pods_and_two_managers_never_double(
    server, api_key, double, managers, tmp_path
):
    gate = tmp_path / "go"
    script = f"while [ ! -f {gate} ]; do sleep 0.2; done; echo released"
    first = managers.start(server, api_key, provider(double), idle_s=8.0)
    jobs = [
        submit(server, api_key, script + f" {i}", allowed_hardware=["1x A40"]) for i in range(2)
    ]
    wait_until(
        lambda: all(status(server, api_key, j["id"])["status"] == "in_progress" for j in jobs),
        90,
        "both jobs running",
    )
    assert len(double.created) == 2
    managers.stop(first)  # pods keep running without a manager
    # two new managers at once: one holds the lease, both see the same two pods
    a = managers.start(server, api_key, provider(double), idle_s=8.0)
    b = managers.start(server, api_key, provider(double), idle_s=8.0)
    extra = submit(server, api_key, "echo third", allowed_hardware=["1x A40"])
    wait_until(lambda: len(double.created) == 3, 60, "one pod for the third job")
    gate.touch()
    wait_until(
        lambda: all(
            status(server, api_key, j["id"])["status"] == "completed" for j in [*jobs, extra]
        ),
        90,
        "all jobs",
    )
    assert len(double.created) == 3  # adopted, never doubled
    wait_until(lambda: double.running() == [], 60, "no pod left")
    lease = {a.holder, b.holder}
    assert len(lease) == 2
