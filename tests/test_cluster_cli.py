"""`ow cluster`, `ow exec`, `ow ssh`, `ow deploy`, `ow manage` as real processes against a real
server (local provider; RunPod through tests/runpod_double.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, base_env, wait_until
from tests.test_cluster import get, submit


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


def env_for(server, key: str, home: Path, **extra: str) -> dict[str, str]:
    env = base_env(home)
    env.update(OPENWEIGHTS_URL=server.url, OPENWEIGHTS_API_KEY=key, **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def ow(*args: str, env: dict, cwd: Path | None = None, timeout: float = 120, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "openweights.cli.main", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
    )


def start_manager(env: dict, log: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "openweights.cli.main", "cluster", "--provider", "local", *flags],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def pod_records(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "cluster" / "local-pods").glob("ow-*.json"))


@pytest.fixture
def procs():
    made: list[subprocess.Popen] = []
    yield made
    for p in made:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _teardown_pods(env: dict) -> None:
    ow("cluster", "--provider", "local", "--terminate-pods", env=env)


@pytest.mark.parametrize("cmd", ["cluster", "deploy", "manage", "exec", "ssh"])
def test_help(cmd):
    r = subprocess.run(
        [sys.executable, "-m", "openweights.cli.main", cmd, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "usage: ow " + cmd in r.stdout


def test_cluster_killed_mid_scale_up_restarts_without_leaking_or_doubling_pods(
    server, api_key, tmp_path, procs
):
    home = tmp_path / "home"
    env_file = tmp_path / "cluster.env"
    env_file.write_text(f"OPENWEIGHTS_URL={server.url}\nOPENWEIGHTS_API_KEY={api_key}\n")
    env = base_env(home)
    gate = tmp_path / "gate"
    job = submit(server, api_key, f"while [ ! -f {gate} ]; do sleep 0.2; done; echo ok")
    first = start_manager(
        env, tmp_path / "m1.log", "--env-file", str(env_file), "--idle-s", "2", "--lease-ttl-s", "6"
    )
    procs.append(first)
    try:
        wait_until(lambda: pod_records(home), 60, "a pod")
        os.killpg(first.pid, signal.SIGKILL)  # no goodbye: its lease must lapse by itself
        first.wait()
        pods = pod_records(home)
        second = start_manager(
            env,
            tmp_path / "m2.log",
            "--env-file",
            str(env_file),
            "--idle-s",
            "2",
            "--lease-ttl-s",
            "6",
        )
        procs.append(second)
        wait_until(
            lambda: get(server, api_key, f"/v1/jobs/{job['id']}")["status"] == "in_progress",
            90,
            "the job to run on the adopted pod",
        )
        assert pod_records(home) == pods  # adopted, not doubled
        gate.touch()
        wait_until(
            lambda: get(server, api_key, f"/v1/jobs/{job['id']}")["status"] == "completed",
            60,
            "the job",
        )
        assert get(server, api_key, f"/v1/jobs/{job['id']}")["attempts"] == 1
        assert len(get(server, api_key, f"/v1/jobs/{job['id']}/runs")["data"]) == 1
        wait_until(lambda: pod_records(home) == [], 90, "the idle pod to stop")
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
        # one pod on record, closed by the second manager; the killed one may have died before
        # reporting the launch, so the job it was for may be unknown, never its token
        (row,) = get(server, api_key, "/v1/cluster/pods")["data"]
        assert row["provider"] == "local" and row["job_id"] in (job["id"], None)
        tokens = {t["id"]: t for t in get(server, api_key, "/v1/tokens")["data"]}
        assert (
            tokens[row["token_id"]]["name"] == row["name"] and tokens[row["token_id"]]["revoked_at"]
        )
        assert row["registered_at"] and row["termination_reason"].startswith("idle for")
    finally:
        env.update(OPENWEIGHTS_URL=server.url, OPENWEIGHTS_API_KEY=api_key)
        _teardown_pods(env)


def test_exec_syncs_streams_exit_code_and_brings_files_back(server, api_key, tmp_path, procs):
    home = tmp_path / "home"
    env = env_for(server, api_key, home)
    procs.append(start_manager(env, tmp_path / "m.log", "--idle-s", "30", "--local-max-pods", "1"))
    proj = tmp_path / "proj"
    (proj / ".venv").mkdir(parents=True)
    (proj / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (proj / ".venv" / "big.bin").write_bytes(b"x" * 1000)
    (proj / "data.txt").write_text("forty-two\n")
    (proj / "debug.log").write_text("not synced\n")
    (proj / ".gitignore").write_text("*.log\n")
    (proj / "main.py").write_text(
        "import os, pathlib\n"
        "print('read', pathlib.Path('data.txt').read_text().strip(), flush=True)\n"
        "print('has log', os.path.exists('debug.log'), 'has venv', os.path.exists('.venv'))\n"
        "pathlib.Path('out').mkdir(exist_ok=True)\n"
        "pathlib.Path('out/result.txt').write_text('done')\n"
        "pathlib.Path('data.txt').write_text('changed')\n"
    )
    try:
        r = ow(
            "exec", "--requires-vram-gb", "0", "python", "main.py", env=env, cwd=proj, timeout=180
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "read forty-two" in r.stdout
        assert "has log False has venv False" in r.stdout
        assert (proj / "out" / "result.txt").read_text() == "done"
        assert (proj / "data.txt").read_text() == "changed"
        assert "wrote back 2 file(s)" in r.stderr
        assert "[ow exec] 1 idle worker(s) fit" in r.stderr or "cpu pod" in r.stderr
        r = ow(
            "exec",
            "--requires-vram-gb",
            "0",
            "echo failing; exit 3",
            env=env,
            cwd=proj,
            timeout=120,
        )
        assert r.returncode == 3 and "failing" in r.stdout, r.stdout + r.stderr
    finally:
        _teardown_pods(env)


def test_ssh_local_runs_in_a_synced_copy_and_brings_changes_back(server, api_key, tmp_path):
    env = env_for(server, api_key, tmp_path / "home")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "hello.txt").write_text("hi there")
    r = ow(
        "ssh",
        "--provider",
        "local",
        "--",
        "cat hello.txt && pwd && echo made > made.txt",
        env=env,
        cwd=proj,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hi there") and str(proj) not in r.stdout
    assert (proj / "made.txt").read_text() == "made\n"


def test_cluster_once_reports_what_it_did_and_why_jobs_wait(server, tmp_path):
    key = server.signup("once-lab")
    env = env_for(server, key, tmp_path / "home")
    small = submit(server, key, "true", requires_vram_gb=0)
    huge = submit(server, key, "echo never", requires_vram_gb=80)
    try:
        r = ow("cluster", "--provider", "local", "--once", env=env)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert len(report["launched"]) == 1 and small["id"] in report["launched"][0]
        assert "80 GB VRAM" in report["waiting"][huge["id"]]
        assert len(pod_records(tmp_path / "home")) == 1
    finally:
        r = ow("cluster", "--provider", "local", "--terminate-pods", env=env)
        assert r.returncode == 0 and pod_records(tmp_path / "home") == []


def test_embedded_service_pool_runs_its_workers_as_local_provider_pods(tmp_path):
    """The embedded default's worker pool is the `local` provider's: `ow-local-0`, a record
    under $OPENWEIGHTS_HOME/pool, gone with its process when the service stops."""
    home = tmp_path / "home"
    env = base_env(home)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    script = (
        "from openweights import OpenWeights; ow = OpenWeights(); "
        "j = ow.jobs.create(type='custom', script='echo pooled'); j = ow.jobs.wait(j.id); "
        "w = [x for x in ow.workers.list() if x.id == j.worker_id][0]; "
        "print(j.status, w.name, w.provider)"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.split() == ["completed", "ow-local-0", "local"]
        record = json.loads((home / "pool" / "ow-local-0.json").read_text())
        assert os.path.exists(f"/proc/{record['pid']}")
    finally:
        ow("service", "stop", env=env, timeout=90)
    assert not (home / "pool" / "ow-local-0.json").exists()
    assert not os.path.exists(f"/proc/{record['pid']}") or (
        open(f"/proc/{record['pid']}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    )


def test_ssh_local_syncs_files_written_here_while_the_shell_runs(server, api_key, tmp_path):
    env = env_for(server, api_key, tmp_path / "home")
    proj = tmp_path / "proj"
    proj.mkdir()
    ready = tmp_path / "ready"
    # the remote side says it runs, then waits (bounded) for a file written here after that
    cmd = (
        f"touch {ready}; for i in $(seq 1 200); do "
        "[ -f late.txt ] && cat late.txt && exit 0; sleep 0.1; done; exit 7"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "openweights.cli.main", "ssh", "--provider", "local", "--", cmd],
        env=env,
        cwd=proj,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(ready.exists, 60, "the remote shell to start")
        (proj / "late.txt").write_text("synced live")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "synced live"
