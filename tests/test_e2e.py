"""End to end: SDK → server → real worker processes → job processes, and the embedded default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from tests.conftest import ROOT, base_env, wait_until


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def worker_token(ow) -> str:
    return ow.tokens.create(name="worker", kind="worker").token


def script_job(ow, script: str, **kw):
    """A custom job whose entrypoint is the given shell command."""
    from openweights import Jobs, register

    class P(BaseModel):
        tag: str = "x"

    @register("shelljob")
    class ShellJob(Jobs):
        mount = {}
        params = P
        requires_vram_gb = 0

        def get_entrypoint(self, validated_params):
            return script

    return ow.shelljob.create(**kw)


def test_custom_job_cookbook_runs_unchanged_on_the_embedded_default(tmp_path):
    env = base_env(tmp_path / "home")
    try:
        out = subprocess.run(
            [sys.executable, "cookbook/custom_job/client_side.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "Job completed successfully" in out.stdout
        assert "'result': 14.0" in out.stdout
        assert "Event data: {'text': 'we can log any dicts'}" in out.stdout
        creds = tmp_path / "home" / "credentials.json"
        assert oct(creds.stat().st_mode & 0o777) == "0o600"
        info = json.loads((tmp_path / "home" / "service.json").read_text())
        # a second script attaches to the same service and sees the same job (same content hash)
        again = subprocess.run(
            [
                sys.executable,
                "-c",
                "from openweights import OpenWeights; ow = OpenWeights(); "
                "print([j.status for j in ow.jobs.list()])",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 0, again.stderr
        assert "completed" in again.stdout
        assert json.loads((tmp_path / "home" / "service.json").read_text())["pid"] == info["pid"]
        status = subprocess.run(
            ["ow", "service", "status"], env=env, capture_output=True, text=True, timeout=60
        )
        assert str(info["pid"]) in status.stdout
    finally:
        subprocess.run(["ow", "service", "stop"], env=env, capture_output=True, timeout=60)
    assert not alive(info["pid"])


def test_worker_runs_a_job_with_mounts_logs_events_and_uploads(server, ow, start_worker, tmp_path):
    from openweights import Jobs, register

    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "data.txt").write_text("mounted data\n")
    (src / "main.py").write_text(
        "import json, os, sys\n"
        "from openweights import OpenWeights\n"
        "p = json.loads(sys.argv[1])\n"
        "ow = OpenWeights()\n"
        "print('hello from the job', open('pkg/data.txt').read().strip(), flush=True)\n"
        "print('secret seen:', os.environ.get('MY_SECRET'), flush=True)\n"
        "print('worker token hidden:', 'OPENWEIGHTS_WORKER_TOKEN' not in os.environ, flush=True)\n"
        "ow.run.log({'loss': 1.5, 'step': 1})\n"
        "ow.run.log({'loss': 0.5, 'step': 2, 'x': p['x']})\n"
        "os.makedirs('uploads/sub', exist_ok=True)\n"
        "open('uploads/sub/result.txt', 'w').write('the result')\n"
    )
    ow.secrets.set("MY_SECRET", "s3cr3t")

    class Params(BaseModel):
        x: int

    @register("mountjob")
    class MountJob(Jobs):
        mount = {str(src / "main.py"): "main.py", str(src / "pkg") + "/": "pkg/"}
        params = Params
        requires_vram_gb = 0

        def get_entrypoint(self, validated_params):
            return f"python main.py '{validated_params.model_dump_json()}'"

    start_worker(server.url, worker_token(ow))
    job = ow.mountjob.create(x=7)
    assert job.id.startswith("mountjob")
    job.wait(timeout=120)
    assert job.status == "completed", job
    assert job.outputs["loss"] == 0.5 and job["outputs"]["x"] == 7
    assert job.outputs["path"] == "uploads/sub/result.txt"
    assert ow.files.content(job.outputs["file"]) == b"the result"
    log = ow.files.content(job.runs[-1].log_file).decode()
    assert "hello from the job mounted data" in log and "secret seen: s3cr3t" in log
    events = ow.events.list(run_id=job.runs[-1].id)
    assert [e["data"].get("step") for e in events if "step" in e["data"]] == [1, 2]
    out = tmp_path / "download"
    job.download(str(out))
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert any(f.endswith("result.txt") for f in files), files
    assert ow.mountjob.create(x=7).id == job.id  # resubmitting a completed job returns it


def test_sigkilled_worker_loses_its_lease_and_another_worker_retries_the_job(
    server, ow, start_worker
):
    token = worker_token(ow)
    a = start_worker(server.url, token, name="a")
    job = script_job(ow, 'echo "attempt $OPENWEIGHTS_RUN_ID"; sleep 4; echo done', tag="kill")
    wait_until(lambda: job.refresh().status == "in_progress", 60, "job start")
    victims = [a.proc.pid, *descendants(a.proc.pid)]
    for pid in victims:  # the whole pod dies: worker and job
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    a.proc.wait()
    start_worker(server.url, token, name="b")
    job.wait(timeout=120)
    assert job.status == "completed"
    runs = job.runs
    assert [r.status for r in runs] == ["lost", "completed"]
    assert runs[-1].attempt == 2 and runs[0].worker_id != runs[-1].worker_id


def test_cancel_stops_the_process_group_within_seconds_and_worker_goes_on(
    server, ow, start_worker, tmp_path
):
    pidfile = tmp_path / "pids"
    start_worker(server.url, worker_token(ow), env={"OPENWEIGHTS_CANCEL_GRACE_S": "2"})
    stubborn = f"trap '' TERM; sleep 1000 & echo $! >> {pidfile}; echo $$ >> {pidfile}; wait"
    job = script_job(ow, stubborn, tag="cancel")
    wait_until(
        lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, 60, "job started"
    )
    pids = [int(p) for p in pidfile.read_text().split()]
    t0 = time.monotonic()
    job.cancel()
    wait_until(lambda: not any(alive(p) for p in pids), 20, "process group killed")
    assert time.monotonic() - t0 < 15
    assert job.refresh().status == "canceled"
    wait_until(lambda: job.runs[-1].status == "canceled", 20, "run canceled")
    nxt = script_job(ow, "echo next", tag="after-cancel")
    nxt.wait(timeout=60)
    assert nxt.status == "completed"


def test_failed_job_reports_exit_code_and_log_tail(server, ow, start_worker):
    start_worker(server.url, worker_token(ow))
    job = script_job(ow, "echo about to fail; exit 7", tag="fail")
    job.wait(timeout=60)
    assert job.status == "failed" and "7" in job.error
    assert "about to fail" in ow.files.content(job.runs[-1].log_file).decode()


def test_logs_follow_streams_live_output(server, ow, api_key, start_worker, tmp_path):
    start_worker(server.url, worker_token(ow))
    gate = tmp_path / "gate"
    job = script_job(
        ow,
        f"echo first line; while [ ! -f {gate} ]; do sleep 0.05; done; echo second line",
        tag="follow",
    )
    env = dict(os.environ, OPENWEIGHTS_URL=server.url, OPENWEIGHTS_API_KEY=api_key)
    proc = subprocess.Popen(
        ["ow", "logs", "-f", job.id], env=env, stdout=subprocess.PIPE, text=True
    )
    first = proc.stdout.readline()
    assert "first line" in first  # seen while the job still runs
    assert job.refresh().status == "in_progress"
    gate.write_text("go")
    rest = proc.communicate(timeout=60)[0]
    assert "second line" in rest and proc.returncode == 0


def test_logs_follow_on_a_terminal_shows_the_jobs_progress_beside_its_log(
    server, ow, api_key, start_worker, tmp_path
):
    import fcntl
    import pty
    import select
    import struct
    import termios

    start_worker(server.url, worker_token(ow))
    gate = tmp_path / "gate"
    log_events = (
        "from openweights import OpenWeights; ow = OpenWeights(); "
        "[ow.run.log({'step': i, 'total_steps': 4, 'loss': 1 / i}) for i in range(1, 5)]"
    )
    job = script_job(
        ow,
        f'python -c "{log_events}"; echo trained; while [ ! -f {gate} ]; do sleep 0.05; done',
        tag="progress",
    )
    env = dict(os.environ, OPENWEIGHTS_URL=server.url, OPENWEIGHTS_API_KEY=api_key)
    master, slave = pty.openpty()  # stderr is a terminal, stdout a pipe (the log stays clean)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 160 columns
    proc = subprocess.Popen(["ow", "logs", "-f", job.id], env=env, stdout=subprocess.PIPE,
                            stderr=slave, text=True)  # fmt: skip
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    while b"step=4" not in seen and time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            seen += os.read(master, 4096)
    gate.write_text("go")
    out = proc.communicate(timeout=60)[0]
    os.close(master)
    assert b"step=4" in seen and b"100%" in seen, seen[-500:]  # a bar: 4 of 4 steps
    assert b"in_progress" in seen
    assert "trained" in out and "step=" not in out and proc.returncode == 0


def test_server_restart_mid_job_loses_nothing(server_factory, start_worker, tmp_path):
    from openweights import OpenWeights

    srv = server_factory("sqlite")
    ow = OpenWeights(base_url=srv.url, api_key=srv.signup())
    start_worker(srv.url, worker_token(ow))
    gate = tmp_path / "gate"
    job = script_job(
        ow,
        f"echo started; while [ ! -f {gate} ]; do sleep 0.05; done; echo finished",
        tag="restart",
    )
    wait_until(lambda: job.refresh().status == "in_progress", 60, "start")
    srv.stop()
    srv.start()  # same home, same port
    gate.write_text("go")
    job.wait(timeout=120)
    assert job.status == "completed"
    assert [r.status for r in job.runs] == ["completed"]
    assert "finished" in ow.files.content(job.runs[-1].log_file).decode()


@pytest.mark.slow
def test_sixteen_workers_run_two_thousand_jobs_each_exactly_once(server_factory, start_worker):
    from openweights import OpenWeights

    # the default lease: with 16 workers on 2 cores, a 3 s test lease can lapse under load and
    # (correctly) retry a job, which is not what this test is about
    srv = server_factory("sqlite", OPENWEIGHTS_LEASE_S=30)
    key = srv.signup()
    ow = OpenWeights(base_url=srv.url, api_key=key)
    c = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    n = 2000
    for i in range(n):
        r = c.post(
            "/v1/jobs",
            json={"type": "custom", "id_prefix": "noop", "params": {"i": i}, "script": "true"},
        )
        assert r.status_code == 200
    token = worker_token(ow)
    for _ in range(16):
        start_worker(srv.url, token)

    def done():
        page = c.get("/v1/jobs", params={"status": "completed", "limit": 1000}).json()
        counts = sum(1 for _ in page["data"])
        return (
            counts == 1000
            and not c.get("/v1/jobs", params={"status": "pending", "limit": 1}).json()["data"]
            and not c.get("/v1/jobs", params={"status": "in_progress", "limit": 1}).json()["data"]
        )

    wait_until(done, 600, "all jobs done", interval_s=1)
    jobs, after = [], None
    while True:
        page = c.get("/v1/jobs", params={"limit": 1000, "after": after}).json()
        jobs += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert len(jobs) == n
    odd = [
        (j["id"], j["status"], j["attempts"], j["error"])
        for j in jobs
        if j["status"] != "completed" or j["attempts"] != 1
    ]
    assert not odd, odd[:10]
    sample = jobs[:: n // 50]
    for j in sample:
        runs = c.get(f"/v1/jobs/{j['id']}/runs").json()["data"]
        assert len(runs) == 1 and runs[0]["status"] == "completed"


def test_worker_paused_past_its_lease_is_fenced_when_it_wakes(server, ow, start_worker, tmp_path):
    token = worker_token(ow)
    a = start_worker(server.url, token, name="zombie")
    marker = tmp_path / "marker"
    job = script_job(
        ow,
        f'echo "$OPENWEIGHTS_RUN_ID" >> {marker}; sleep 6; echo "done $OPENWEIGHTS_RUN_ID" >> {marker}',
        tag="zombie",
    )
    wait_until(lambda: marker.exists(), 60, "first attempt started")
    group = [a.proc.pid, *descendants(a.proc.pid)]
    for pid in group:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: job.refresh().status == "pending", 30, "requeue after lease loss")
        start_worker(server.url, token, name="healthy")
        wait_until(lambda: job.refresh().status == "in_progress", 60, "second attempt")
    finally:
        for pid in group:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    job.wait(timeout=120)
    assert job.status == "completed"
    runs = job.runs
    assert [r.status for r in runs] == ["lost", "completed"]
    # the woken zombie was refused (409) and killed its copy, which gave no second completion.
    # Its copy may still have reached its own side effect before the worker heard it was fenced
    # (a `sleep` that was stopped past its end returns at once): fencing refuses stale writes to
    # the queue, it cannot undo what a process did outside it; jobs must be idempotent.
    wait_until(lambda: not any(alive(p) for p in group[1:]), 30, "zombie's job killed")
    assert f"done {runs[-1].id}" in marker.read_text()
    assert runs[0].finished_at is not None and runs[0].exit_code is None  # lost, never completed
    assert a.proc.poll() is None  # the zombie worker itself goes on
