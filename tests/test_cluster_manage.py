"""`ow deploy`, `ow manage` (+ the operator's `ow cluster --supervise`), the cluster routes and the
worker image's entrypoint, against a real server (RunPod through tests/runpod_double.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, base_env, wait_until
from tests.runpod_double import RunPodDouble
from tests.test_cluster import get, submit
from tests.test_cluster_cli import env_for, ow


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


@pytest.fixture
def procs():
    made: list[subprocess.Popen] = []
    yield made
    for p in made:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_deploy_starts_the_manager_on_a_runpod_cpu_pod_without_the_provider_key(
    server, api_key, tmp_path
):
    double = RunPodDouble(api_key="rp-deploy", workdir=tmp_path / "pods", boot_workers=False)
    double.start()
    try:
        env = env_for(server, api_key, tmp_path / "home", RUNPOD_API_BASE_URL=double.url)
        r = ow("deploy", env=env)
        assert r.returncode == 1 and "RUNPOD_API_KEY is not set" in r.stderr
        httpx.put(
            f"{server.url}/v1/secrets/RUNPOD_API_KEY",
            json={"value": "rp-deploy"},
            headers={"Authorization": f"Bearer {api_key}"},
            trust_env=False,
        ).raise_for_status()
        r = ow("deploy", "--cluster-args", "--max-workers 2", env=env)
        assert r.returncode == 0, r.stderr
        pod_id = r.stdout.strip()
        pod = double.pods[pod_id]
        assert pod.gpu_type_id is None and pod.image.endswith("ow-cluster:0.1")
        assert pod.name.startswith("owcm-")
        assert "rp-deploy" not in pod.env.values() and pod.env["OPENWEIGHTS_API_KEY"] != api_key
        assert pod.env["OW_CLUSTER_ARGS"] == "--max-workers 2"
        r = ow("deploy", "--stop", pod_id, env=env)
        assert r.returncode == 0 and double.pods[pod_id].desired == "TERMINATED"
    finally:
        double.stop()


def test_manage_checks_secrets_and_reports_status(server, tmp_path):
    key = server.signup("managed-lab")
    env = env_for(server, key, tmp_path / "home")
    r = ow("manage", "start", env=env)
    assert r.returncode == 1 and "lack RUNPOD_API_KEY" in r.stderr
    httpx.put(
        f"{server.url}/v1/secrets/RUNPOD_API_KEY",
        json={"value": "k"},
        headers={"Authorization": f"Bearer {key}"},
        trust_env=False,
    ).raise_for_status()
    assert ow("manage", "start", env=env).returncode == 0
    r = ow("manage", "status", env=env)
    assert (
        r.returncode == 0 and "managed:        yes" in r.stdout and "pending jobs:   0" in r.stdout
    )
    assert "pods running:   0 (0.00 USD billed so far)" in r.stdout
    assert "0.00 USD of job runs, 0.00 USD of pod time" in r.stdout
    assert ow("manage", "stop", env=env).returncode == 0
    names = [s["name"] for s in get(server, key, "/v1/secrets")["data"]]
    assert "OW_MANAGED" not in names and "RUNPOD_API_KEY" in names


def test_cluster_secrets_route_returns_only_cluster_secrets(server, api_key):
    h = {"Authorization": f"Bearer {api_key}"}
    httpx.put(
        f"{server.url}/v1/secrets/HF_TOKEN", json={"value": "x"}, headers=h
    ).raise_for_status()
    r = httpx.post(f"{server.url}/v1/cluster/secrets", json={"names": ["HF_TOKEN"]}, headers=h)
    assert r.status_code == 400 and "not HF_TOKEN" in r.json()["error"]["message"]
    worker = httpx.post(
        f"{server.url}/v1/tokens", json={"name": "w", "kind": "worker"}, headers=h
    ).json()["token"]
    r = httpx.post(
        f"{server.url}/v1/cluster/secrets",
        json={"names": ["RUNPOD_API_KEY"]},
        headers={"Authorization": f"Bearer {worker}"},
    )
    assert r.status_code == 403
    costs = httpx.get(f"{server.url}/v1/cluster/costs", headers=h).json()
    assert json.dumps(costs) and "total_usd" in costs


def test_estimate_names_hardware_price_and_wait(server):
    h = {"Authorization": f"Bearer {server.signup('estimate-lab')}"}
    est = httpx.post(
        f"{server.url}/v1/cluster/estimate", json={"requires_vram_gb": 24}, headers=h
    ).json()
    assert est["hardware_type"] == "1x A5000" and est["price_per_hour"] == 0.27
    assert est["estimated_wait_s"] == 300 and "1x A5000 pod (0.27 USD/h)" in est["message"]
    est = httpx.post(
        f"{server.url}/v1/cluster/estimate",
        json={"allowed_hardware": ["2x A100", "1x H200"]},
        headers=h,
    ).json()
    assert est["hardware_type"] == "2x A100" and est["price_per_hour"] == 2.78
    est = httpx.post(
        f"{server.url}/v1/cluster/estimate", json={"requires_vram_gb": 5000}, headers=h
    ).json()
    assert est["hardware_type"] is None and "wait forever" in est["message"]


def test_worker_image_entrypoint_starts_a_worker_named_for_its_pod(server, api_key, tmp_path):
    """docker/entrypoint-worker.sh (the contract custom images follow), run outside docker."""
    token = httpx.post(
        f"{server.url}/v1/tokens",
        json={"name": "ow-ep-1-a", "kind": "worker"},
        headers={"Authorization": f"Bearer {api_key}"},
    ).json()["token"]
    env = base_env(tmp_path / "home")
    env.update(
        OPENWEIGHTS_URL=server.url,
        OPENWEIGHTS_API_KEY=token,
        OW_WORKER_NAME="ow-ep-1-a",
        OW_DOCKER_IMAGE="me/custom:1",
        OW_PROVIDER="runpod",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.Popen(
        ["bash", str(ROOT / "docker" / "entrypoint-worker.sh")],
        env=env,
        stdout=open(tmp_path / "ep.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        w = wait_until(
            lambda: next(
                (
                    w
                    for w in get(server, api_key, "/v1/workers")["data"]
                    if w["name"] == "ow-ep-1-a"
                ),
                None,
            ),
            60,
            "the entrypoint's worker to register",
        )
        assert w["docker_image"] == "me/custom:1" and w["provider"] == "runpod"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_manage_start_gets_a_managed_manager_from_the_supervisor(server, tmp_path, procs):
    """`ow manage start` + the operator's `ow cluster --supervise`: pods appear for the org's
    queue without the user running anything; `ow manage stop` retires the manager."""
    double = RunPodDouble(api_key="rp-managed", workdir=tmp_path / "pods").start()
    try:
        key = server.signup("managed-org")
        h = {"Authorization": f"Bearer {key}"}
        for name, value in {"RUNPOD_API_KEY": "rp-managed", "OW_IDLE_S": "2"}.items():
            httpx.put(f"{server.url}/v1/secrets/{name}", json={"value": value}, headers=h)
        env = env_for(server, key, tmp_path / "home")
        assert ow("manage", "start", env=env).returncode == 0
        sup_env = dict(server.env)
        sup_env.update(
            OPENWEIGHTS_URL=server.url,
            RUNPOD_API_BASE_URL=double.url,
            PYTHONPATH=str(ROOT),
        )
        sup = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openweights.cli.main",
                "cluster",
                "--supervise",
                "--scan-s",
                "1",
            ],
            env=sup_env,
            stdout=open(tmp_path / "sup.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(sup)
        job = submit(server, key, "echo managed", allowed_hardware=["1x A40"])
        wait_until(
            lambda: get(server, key, f"/v1/jobs/{job['id']}")["status"] == "completed",
            120,
            "the job on a pod the managed manager started",
        )
        assert len(double.created) == 1
        wait_until(lambda: double.running() == [], 60, "the idle pod to stop")
        tokens = get(server, key, "/v1/tokens")["data"]
        assert any(t["name"] == "managed cluster manager" and not t["revoked_at"] for t in tokens)
        assert ow("manage", "stop", env=env).returncode == 0
        wait_until(
            lambda: all(
                t["revoked_at"]
                for t in get(server, key, "/v1/tokens")["data"]
                if t["name"] == "managed cluster manager"
            ),
            60,
            "the managed manager's token to be revoked",
        )
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
    finally:
        double.stop()


@pytest.fixture
def sshd(tmp_path):
    """A real sshd on a free loopback port: what a RunPod pod's SSH port leads to."""
    import shutil
    import socket

    exe = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(exe) or os.geteuid() != 0 or shutil.which("rsync") is None:
        pytest.skip("needs openssh-server's sshd, rsync and root (apt-get install openssh-server)")
    d = tmp_path / "sshd"
    d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hk")], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    authorized = d / "authorized_keys"
    authorized.touch(mode=0o600)
    (d / "cfg").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'hk'}\n"
        f"AuthorizedKeysFile {authorized}\nPermitRootLogin prohibit-password\n"
        f"PasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile {d / 'pid'}\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen(
        [exe, "-D", "-e", "-f", str(d / "cfg")],
        stdout=open(d / "log", "ab"),
        stderr=subprocess.STDOUT,
    )

    def listening():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 30, "sshd to listen")
        yield port, authorized
    finally:
        proc.terminate()
        proc.wait(10)


def test_ssh_on_runpod_starts_a_pod_syncs_runs_and_terminates_it(server, tmp_path, sshd):
    """`ow ssh` against the RunPod double, whose pod's SSH port is a real sshd here: the pod
    gets PUBLIC_KEY, the directory is rsynced (no .venv), a file written here while the command
    runs reaches the pod, the command's exit code is ow's, and the pod is terminated."""
    port, authorized = sshd
    double = RunPodDouble(
        api_key="rp-ssh",
        workdir=tmp_path / "pods",
        boot_workers=False,
        ssh_port=port,
        authorized_keys=authorized,
    ).start()
    try:
        key = server.signup("ssh-lab")
        httpx.put(
            f"{server.url}/v1/secrets/RUNPOD_API_KEY",
            json={"value": "rp-ssh"},
            headers={"Authorization": f"Bearer {key}"},
        ).raise_for_status()
        sshkey = tmp_path / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshkey)], check=True
        )
        proj = tmp_path / "proj"
        (proj / ".venv").mkdir(parents=True)
        (proj / ".venv" / "big.bin").write_bytes(b"x" * 100)
        (proj / "hello.txt").write_text("hello pod")
        remote, ready = tmp_path / "remote", tmp_path / "ready"
        cmd = (
            f"cat hello.txt; ls -a; touch {ready}; for i in $(seq 1 100); do "
            "[ -f late.txt ] && cat late.txt && exit 5; sleep 0.1; done; exit 9"
        )
        env = env_for(server, key, tmp_path / "home", RUNPOD_API_BASE_URL=double.url)
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "openweights.cli.main", "ssh", "--gpu", "1x A40",
                "--key-path", str(sshkey), "--remote-dir", str(remote), "--", cmd,
            ],
            env=env,
            cwd=proj,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            wait_until(ready.exists, 90, "the command to run on the pod")
            (proj / "late.txt").write_text("synced while running")
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 5, err
        assert "hello pod" in out and "synced while running" in out and ".venv" not in out
        (pod,) = double.created
        assert pod.env["PUBLIC_KEY"] == (tmp_path / "id_ed25519.pub").read_text().strip()
        assert pod.name.startswith("owssh-") and pod.desired == "TERMINATED"
        assert (remote / "hello.txt").read_text() == "hello pod"
        assert (tmp_path / "home" / "ssh" / "known_hosts").exists()  # not the user's own
    finally:
        double.stop()
