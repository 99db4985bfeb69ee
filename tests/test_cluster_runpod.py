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


def pods_of(server, key) -> dict[str, dict]:
    """The org's `cluster_pods` rows by pod id."""
    return {p["pod_id"]: p for p in get(server, key, "/v1/cluster/pods")["data"]}


def ran_once(server, key, job_id) -> bool:
    """Completed after exactly one attempt, with one run."""
    job = status(server, key, job_id)
    runs = get(server, key, f"/v1/jobs/{job_id}/runs")["data"]
    return job["status"] == "completed" and job["attempts"] == 1 and len(runs) == 1


def reason_of(server, key, job_id) -> str:
    return status(server, key, job_id).get("pending_reason") or ""


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
    server, api_key, double, managers, tmp_path
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
    # its billed time is on record: launch, registration, termination, price, token, job
    (row,) = pods_of(server, api_key).values()
    assert row["provider"] == "runpod" and row["hardware_type"] == "1x H200"
    assert row["price_per_hour"] == pytest.approx(3.59) and row["job_id"] == job["id"]
    assert row["token_id"] == me["token"]["id"] and row["worker_id"] == done["worker_id"]
    assert row["launched_at"] <= row["registered_at"] <= row["terminated_at"]
    assert row["termination_reason"].startswith("idle for")
    assert row["billed_s"] == pytest.approx(row["terminated_at"] - row["launched_at"], abs=0.01)
    costs = get(server, api_key, "/v1/cluster/costs")
    (run,) = [r for r in costs["runs"] if r["job_id"] == job["id"]]
    assert run["pod_id"] == row["pod_id"] and run["price_per_hour"] == pytest.approx(3.59)
    assert run["hardware_type"] == "1x H200" and run["provider"] == "runpod"
    assert run["started_at"] <= run["finished_at"]
    assert costs["billed_usd"] >= row["cost_usd"] > 0 and costs["billed_usd"] > costs["total_usd"]
    # `ow ls --cost`: each job's cost, and the org's
    from tests.test_cluster_cli import env_for, ow

    r = ow("ls", "--cost", env=env_for(server, api_key, tmp_path / "home"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[-2:] == ["COST", "USD"]
    (line,) = [ln for ln in lines if ln.startswith(job["id"])]
    assert line.split()[-1] == f"{costs['by_job'][job['id']]:.4f}"
    assert "USD of job runs" in lines[-1] and "USD of pod time billed" in lines[-1]
    # the SDK: the same pods and costs; the next such job's wait is this pod's boot time
    from openweights import OpenWeights

    with OpenWeights(base_url=server.url, api_key=api_key) as client:
        assert [x.pod_id for x in client.cluster.pods()] == [row["pod_id"]]
        assert client.cluster.pods(running=True) == []
        assert client.cluster.costs(job_id=job["id"]).by_job == {
            job["id"]: costs["by_job"][job["id"]]
        }
        est = client.cluster.estimate(allowed_hardware=["1x H200"])
    boot = row["registered_at"] - row["launched_at"]
    assert est.hardware_type == "1x H200" and est.price_per_hour == pytest.approx(3.59)
    assert est.boot_s_observed == pytest.approx(boot, abs=0.1) == est.estimated_wait_s
    assert "median of the last 1 such pods" in est.message


def test_pod_that_never_boots_is_replaced_and_its_hardware_backed_off(
    server, api_key, double, managers
):
    double.never_boot.add(A100)
    m = managers.start(
        server, api_key, provider(double), idle_s=1.0, boot_deadline_s=10.0, failure_threshold=1
    )
    job = submit(server, api_key, "echo booted", requires_vram_gb=70)
    # the job says which pod it waits for (the manager's reason, in the job's pending_reason)
    reason = wait_until(
        lambda: "is booting for it" in (r := reason_of(server, api_key, job["id"])) and r,
        30,
        "the booting pod in the job's pending_reason",
        interval_s=0.1,
    )
    assert "Cluster manager: pod ow-" in reason and "(1x A100)" in reason
    wait_until(lambda: ran_once(server, api_key, job["id"]), 90, "the job, once")
    kinds = [p.gpu_type_id for p in double.created]
    assert kinds[0] == A100 and kinds[-1] == H100 and A100 not in kinds[1:]
    assert not m.health.available("1x A100")
    # a job that allows only the hardware on cooldown is told so
    a100_only = submit(server, api_key, "echo a100", allowed_hardware=["1x A100"])
    wait_until(
        lambda: "1x A100 is cooling down" in reason_of(server, api_key, a100_only["id"]),
        30,
        "the cooldown in the job's pending_reason",
    )
    httpx.post(
        f"{server.url}/v1/jobs/{a100_only['id']}/cancel",
        headers={"Authorization": f"Bearer {api_key}"},
        trust_env=False,
    ).raise_for_status()
    wait_until(lambda: double.running() == [], 60, "no pod left")
    never = pods_of(server, api_key)[double.created[0].id]
    assert never["registered_at"] is None and never["terminated_at"] is not None
    assert "did not register within 10s" in never["termination_reason"]


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
    # the second pod is deleted at the provider by hand: its billed time ends all the same
    double.delete(double.created[1].id)
    wait_until(
        lambda: all(p["terminated_at"] for p in pods_of(server, api_key).values()),
        60,
        "both pods' billed time to end",
    )
    rows = pods_of(server, api_key)
    assert "stopped (exited)" in rows[double.created[0].id]["termination_reason"]
    assert rows[double.created[1].id]["termination_reason"] == "the provider lists it no more"
    assert double.running() == []


def test_spend_cap_reached_mid_burst_holds_launches_says_so_and_runs_every_job_once(
    server, api_key, double, managers, tmp_path
):
    gate = tmp_path / "go"
    m = managers.start(server, api_key, provider(double), idle_s=2.0, max_spend_per_hour=6.0)
    script = f"while [ ! -f {gate} ]; do sleep 0.2; done; echo"
    jobs = [
        submit(server, api_key, f"{script} {i}", allowed_hardware=["1x H100"]) for i in range(4)
    ]
    # two 1x H100 pods (2.69 USD/h each) fit under 6 USD/h; the burst's other two wait, and say why
    wait_until(
        lambda: sum(status(server, api_key, j["id"])["status"] == "in_progress" for j in jobs) == 2,
        90,
        "two jobs running",
    )
    waiting = [j for j in jobs if status(server, api_key, j["id"])["status"] == "pending"]
    assert len(waiting) == 2
    for j in waiting:
        reason = wait_until(
            lambda j=j: "spend cap" in (r := reason_of(server, api_key, j["id"])) and r,
            30,
            "the spend cap in the job's pending_reason",
        )
        assert "5.38 USD/h running, 1x H100 costs 2.69 USD/h, cap 6.00 USD/h" in reason
    # the estimate of a created job: its hardware, price, the jobs before it, the manager's word
    from openweights import OpenWeights

    with OpenWeights(base_url=server.url, api_key=api_key) as client:
        est = client.cluster.estimate(job_id=waiting[-1]["id"])
    assert est.hardware_type == "1x H100" and est.price_per_hour == pytest.approx(2.69)
    assert est.busy_workers == 2 and est.idle_workers == 0 and est.jobs_ahead == 1
    assert "spend cap" in est.manager_reason and "spend cap" in est.message
    assert len(double.created) == 2 and m.last_report.spend_per_hour == pytest.approx(5.38)
    gate.touch()
    wait_until(
        lambda: all(ran_once(server, api_key, j["id"]) for j in jobs), 120, "every job, once"
    )
    assert len(double.created) == 2
    wait_until(lambda: double.running() == [], 60, "no pod left")
    rows = pods_of(server, api_key)
    assert len(rows) == 2 and all(r["terminated_at"] for r in rows.values())


def test_provider_rate_limits_and_5xx_only_delay_the_launch(server, api_key, double, managers):
    double.rate_limit_next = 1
    double.fail_next = 1
    managers.start(server, api_key, provider(double), idle_s=1.0)
    job = submit(server, api_key, "echo ok", allowed_hardware=["1x A40"])
    wait_until(lambda: status(server, api_key, job["id"])["status"] == "completed", 120, "job")
    assert "429" in double.requests and "500" in double.requests
    assert len(double.created) == 1 and ran_once(server, api_key, job["id"])
    wait_until(lambda: double.running() == [], 60, "no pod left")


def test_launch_that_times_out_after_the_pod_started_adopts_that_pod(
    server, api_key, double, managers
):
    """RunPod answers the deploy after our client gave up, yet starts the pod: the manager
    keeps the pod's token, finds the pod in the next listing and runs the job on it."""
    double.hang_deploy_s = 2.0
    m = managers.start(server, api_key, provider(double, timeout_s=1.0), idle_s=1.0)
    job = submit(server, api_key, "echo adopted", allowed_hardware=["1x A40"])
    wait_until(lambda: ran_once(server, api_key, job["id"]), 90, "the job, once")
    assert len(double.created) == 1  # no second pod while the first was unaccounted for
    assert not m._unsure
    wait_until(lambda: double.running() == [], 60, "no pod left")
    (row,) = pods_of(server, api_key).values()
    assert row["job_id"] == job["id"] and row["token_id"] and row["terminated_at"]


def test_pending_reason_says_why_no_pod_starts_and_clears_when_the_manager_stops(
    server, api_key, double, managers, tmp_path
):
    gate = tmp_path / "go"
    m = managers.start(server, api_key, provider(double), idle_s=1.0, max_workers=1)
    first = submit(
        server, api_key, f"while [ ! -f {gate} ]; do sleep 0.2; done", allowed_hardware=["1x A40"]
    )
    wait_until(lambda: status(server, api_key, first["id"])["status"] == "in_progress", 90, "A")
    second = submit(server, api_key, "echo second", allowed_hardware=["1x A40"])
    huge = submit(server, api_key, "echo never", requires_vram_gb=5000)
    wait_until(
        lambda: "max_workers reached: 1 of 1 pods run" in reason_of(server, api_key, second["id"]),
        30,
        "max_workers in the second job's pending_reason",
    )
    reason = wait_until(
        lambda: "Cluster manager:" in (r := reason_of(server, api_key, huge["id"])) and r,
        30,
        "huge",
    )
    assert "no hardware of provider runpod has 5000 GB VRAM" in reason
    # `ow ls` shows the manager's reasons too
    from tests.test_cluster_cli import env_for, ow

    r = ow("ls", "--cost", env=env_for(server, api_key, tmp_path / "home"))
    assert r.returncode == 0, r.stderr
    assert "WAITING FOR" in r.stdout.splitlines()[0]
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines()[1:-1]}
    assert "no hardware of provider runpod has 5000 GB VRAM" in lines[huge["id"]]
    assert "max_workers reached: 1 of 1 pods run" in lines[second["id"]]
    managers.stop(m)  # a stopped manager's reasons go with it
    assert "Cluster manager" not in reason_of(server, api_key, huge["id"])
    assert "Cluster manager" not in reason_of(server, api_key, second["id"])
    m = managers.start(server, api_key, provider(double), idle_s=1.0, max_workers=1)
    gate.touch()
    wait_until(
        lambda: ran_once(server, api_key, first["id"]) and ran_once(server, api_key, second["id"]),
        90,
        "both jobs, once each, on the one pod",
    )
    assert len(double.created) == 1
    httpx.post(
        f"{server.url}/v1/jobs/{huge['id']}/cancel",
        headers={"Authorization": f"Bearer {api_key}"},
        trust_env=False,
    ).raise_for_status()
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
    assert all(ran_once(server, api_key, j["id"]) for j in [*jobs, extra])
    wait_until(lambda: double.running() == [], 60, "no pod left")
    rows = pods_of(server, api_key)
    assert sorted(rows) == sorted(p.id for p in double.created)
    assert all(r["registered_at"] and r["terminated_at"] for r in rows.values())
    lease = {a.holder, b.holder}
    assert len(lease) == 2


def test_cluster_resource_has_sync_and_async_twins():
    import inspect

    from openweights.client.cluster import AsyncCluster, Cluster

    names = [n for n in dir(Cluster) if not n.startswith("_")]
    assert names == [n for n in dir(AsyncCluster) if not n.startswith("_")]
    assert set(names) == {"costs", "estimate", "pods"}
    for n in names:
        assert inspect.iscoroutinefunction(getattr(AsyncCluster, n))
        assert inspect.signature(getattr(Cluster, n)) == inspect.signature(getattr(AsyncCluster, n))


def test_silent_worker_pod_is_terminated_and_its_job_runs_on_a_new_pod(
    server, api_key, double, managers, tmp_path
):
    """A pod that is up but whose worker stopped heartbeating (frozen): replaced."""
    import os
    import signal

    managers.start(server, api_key, provider(double), idle_s=1.0, heartbeat_timeout_s=4.0)
    marker = tmp_path / "first-attempt"
    script = f"if [ -f {marker} ]; then echo second; else touch {marker}; sleep 120; fi"
    job = submit(server, api_key, script, allowed_hardware=["1x A40"])
    wait_until(lambda: marker.exists(), 90, "the first attempt to start")
    frozen = double.created[0]
    os.killpg(frozen.proc.pid, signal.SIGSTOP)  # the pod stays up; its worker says nothing
    done = wait_until(
        lambda: (j := status(server, api_key, job["id"]))["status"] == "completed" and j,
        90,
        "the job to complete on another pod",
    )
    assert done["attempts"] == 2 and len(double.created) == 2
    runs = get(server, api_key, f"/v1/jobs/{job['id']}/runs")["data"]
    assert [r["status"] for r in runs] == ["lost", "completed"]
    assert frozen.desired == "TERMINATED"
    wait_until(lambda: double.running() == [], 60, "no pod left")
    assert "sent no heartbeat" in pods_of(server, api_key)[frozen.id]["termination_reason"]


def test_docker_image_of_a_job_selects_its_pods_image(server, api_key, double, managers):
    managers.start(server, api_key, provider(double), idle_s=1.0)
    first = submit(
        server, api_key, "echo custom", allowed_hardware=["1x A40"], docker_image="me/a:1"
    )
    done = wait_until(
        lambda: (j := status(server, api_key, first["id"]))["status"] == "completed" and j, 90, "a"
    )
    # a job of another image is not taken by that worker: it gets a pod of its own image
    second = submit(
        server, api_key, "echo other", allowed_hardware=["1x A40"], docker_image="me/b:2"
    )
    done2 = wait_until(
        lambda: (j := status(server, api_key, second["id"]))["status"] == "completed" and j, 90, "b"
    )
    assert [p.image for p in double.created] == ["me/a:1", "me/b:2"]
    assert [p.env["OW_DOCKER_IMAGE"] for p in double.created] == ["me/a:1", "me/b:2"]
    workers = {w["id"]: w for w in get(server, api_key, "/v1/workers")["data"]}
    assert workers[done["worker_id"]]["docker_image"] == "me/a:1"
    assert workers[done2["worker_id"]]["docker_image"] == "me/b:2"
    wait_until(lambda: double.running() == [], 60, "no pod left")
    assert {r["image"] for r in pods_of(server, api_key).values()} == {"me/a:1", "me/b:2"}


def test_job_whose_pod_dies_on_its_last_attempt_fails_with_the_reason(
    server, api_key, double, managers, tmp_path
):
    managers.start(server, api_key, provider(double), idle_s=1.0)
    marker = tmp_path / "started"
    job = submit(
        server,
        api_key,
        f"touch {marker}; sleep 120",
        allowed_hardware=["1x A40"],
        max_attempts=1,
    )
    wait_until(lambda: marker.exists(), 90, "the job to start")
    double.crash(double.created[0].id)
    failed = wait_until(
        lambda: (j := status(server, api_key, job["id"]))["status"] == "failed" and j,
        60,
        "the job to fail",
    )
    assert "stopped (exited)" in failed["error"] and failed["attempts"] == 1
    assert len(double.created) == 1  # not retried on another pod: it had no attempt left
    wait_until(lambda: double.running() == [], 30, "no pod left")
