"""R1 (docs: /work/shared/reference/reliability-anchors.md): random SIGKILLs of whole worker "pods"
(the worker process and its job processes) while real workers drain a queue of jobs.

R1 asks for 1,000 jobs x 8 workers and >= 50 random SIGKILLs, on SQLite and on PostgreSQL, with
0 lost jobs, 0 jobs with more than one accepted completion and attempts <= max_attempts.

Scaled here to 300 jobs x 8 workers so that one backend takes about two minutes on a 2-core
machine: the server, eight workers and their job shells share the two cores, and every kill also
starts a replacement worker (about a second of CPU to import and register). 1,000 jobs would take
several minutes per backend here without testing anything more: what matters is the number of
kills and where they land. Each job sleeps 0.5-1.5 s, so the 300 jobs keep 8 workers busy for
at least 300 x 1 s / 8 = 37 s of pure sleep (60-110 s here with the per-job overhead and the
retries), and a kill every 0.5-1 s (a steady cadence) gives 80-150 kills in that time; the
asserted floor is 50 kills on SQLite and 40 on PostgreSQL. Each kill picks a pod at random: one
running a job (about half of the kills), one idle in its claim long-poll, or one still starting.

The lease is 2 s so lost runs come back quickly; max_attempts is 10 so a job is rarely unlucky
enough to be killed 10 times, and when it is, the test checks that it failed the right way.

Besides the assertions, the test prints what it saw: kills, lost runs, jobs that ran more than
once (at-least-once), runs the server handed to a worker after it was killed (a claim long-poll
that outlived its client), the most-retried jobs, and suspicious server and worker log lines.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_until
from tests.test_e2e import alive, descendants

LEASE_S = 2.0
MAX_ATTEMPTS = 10
N_JOBS = 300
N_WORKERS = 8
KILL_PACE_S = (0.5, 1.0)
JOB_SLEEP_S = (0.5, 1.5)
MIN_KILLS = {"sqlite": 50, "postgres": 40}
SUSPICIOUS = (
    "Traceback",
    "unhandled error",
    "lease sweep failed",
    "worker crashed",
    "Internal server error",
    "database is locked",
    "deadlock",
)


def _run_id_of(pid: int) -> int | None:
    """The run a job process belongs to (the worker puts OPENWEIGHTS_RUN_ID in its environment)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"OPENWEIGHTS_RUN_ID="):
            return int(item.split(b"=", 1)[1])
    return None


def _kill_pod(pid: int) -> tuple[list[int], set[int]]:
    """SIGKILL a worker and every process it started (job shells live in their own sessions).

    The worker is frozen first so it cannot start (or report) a job between the listing and the
    kill. Returns the pids that were signalled and the runs whose job processes were alive: the
    worker had not reported those runs (it reaps the job before it reports), so they must end lost.
    """
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return [], set()
    victims = descendants(pid)
    held = {r for r in map(_run_id_of, victims) if r is not None}
    for p in victims:
        for kill in (os.killpg, os.kill):  # a job's shell leads its own process group
            try:
                kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        os.killpg(pid, signal.SIGKILL)  # start_new_session: the worker leads its group
    except ProcessLookupError:
        pass
    return [pid, *victims], held


def _all_jobs(c: httpx.Client) -> list[dict]:
    jobs, after = [], None
    while True:
        params = {"limit": 1000, **({"after": after} if after else {})}
        page = c.get("/v1/jobs", params=params).raise_for_status().json()
        jobs += page["data"]
        if not page["has_more"]:
            return jobs
        after = page["data"][-1]["id"]


def _any_unfinished(c: httpx.Client) -> bool:
    return any(
        c.get("/v1/jobs", params={"status": s, "limit": 1}).raise_for_status().json()["data"]
        for s in ("pending", "in_progress")
    )


def _suspicious_lines(text: str, context: int = 25) -> list[str]:
    """Suspicious lines, each with the lines that follow it (a traceback)."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if any(s in line for s in SUSPICIOUS)]
    return ["\n".join(lines[i : i + context]) for i in hits]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_random_sigkills_of_worker_pods_lose_no_job_and_complete_each_at_most_once(
    backend, server_factory, start_worker, tmp_path
):
    from openweights import OpenWeights

    t_start = time.monotonic()
    rng = random.Random(f"r1-{backend}")
    srv = server_factory(
        backend, OPENWEIGHTS_LEASE_S=LEASE_S, OPENWEIGHTS_MAX_ATTEMPTS=MAX_ATTEMPTS
    )
    key = srv.signup()
    ow = OpenWeights(base_url=srv.url, api_key=key)
    token = ow.tokens.create(name="chaos-workers", kind="worker").token
    c = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    # -- submit: each job records its side effect (start, then done after a short sleep) --------
    effects = tmp_path / "effects.txt"
    submitted: set[str] = set()
    for i in range(N_JOBS):
        sleep_s = round(rng.uniform(*JOB_SLEEP_S), 2)
        script = (
            f'echo "start $OPENWEIGHTS_JOB_ID $OPENWEIGHTS_RUN_ID" >> {effects}; '
            f"sleep {sleep_s}; "
            f'echo "done $OPENWEIGHTS_JOB_ID $OPENWEIGHTS_RUN_ID" >> {effects}'
        )
        r = c.post(
            "/v1/jobs",
            json={
                "type": "custom",
                "id_prefix": "chaos",
                "params": {"validated_params": {"i": i, "sleep_s": sleep_s}},
                "script": script,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["max_attempts"] == MAX_ATTEMPTS
        submitted.add(r.json()["id"])
    assert len(submitted) == N_JOBS

    # -- workers and chaos -----------------------------------------------------------------------
    n_started = 0
    live: dict[str, object] = {}  # name -> Worker
    killed_at: dict[str, float] = {}  # worker name -> epoch time of its SIGKILL
    held_at_kill: set[int] = set()  # runs whose job process was alive when its pod was killed
    logs: list[Path] = []

    def spawn() -> None:
        nonlocal n_started
        name = f"chaos-{n_started}"
        n_started += 1
        w = start_worker(srv.url, token, name=name)
        live[name] = w
        logs.append(w.log)

    for _ in range(N_WORKERS):
        spawn()

    t_chaos, t0 = time.monotonic(), time.time()
    chaos_deadline = t_chaos + 360
    next_kill = t_chaos
    while True:
        # a steady cadence: the loop's own work (API calls, /proc scans) does not slow it down
        next_kill = max(next_kill, time.monotonic()) + rng.uniform(*KILL_PACE_S)
        time.sleep(max(0.0, next_kill - time.monotonic()))
        if not _any_unfinished(c):
            break
        assert time.monotonic() < chaos_deadline, "jobs still unfinished after 360 s of chaos"
        # a random pod: running a job, idle in its claim long-poll, or still starting up
        # (uniform: a bias towards busy pods would hammer the last few jobs of the queue)
        names = sorted(live)
        name = rng.choice(names)
        w = live.pop(name)
        killed_at[name] = time.time()
        victims, held = _kill_pod(w.proc.pid)
        held_at_kill |= held
        w.proc.wait()
        wait_until(
            lambda v=victims: not any(alive(p) for p in v), 10, f"pod {name} ({victims}) to die"
        )
        spawn()
    chaos_s = time.monotonic() - t_chaos

    # -- invariants, through the API -------------------------------------------------------------
    jobs = _all_jobs(c)
    assert {j["id"] for j in jobs} == submitted, "a job vanished or appeared"
    not_terminal = [
        (j["id"], j["status"]) for j in jobs if j["status"] not in ("completed", "failed")
    ]
    assert not not_terminal, f"lost or stuck jobs: {not_terminal[:10]}"

    workers = c.get("/v1/workers").raise_for_status().json()["data"]
    name_of = {w["id"]: w["name"] for w in workers}
    runs_of = {
        j["id"]: c.get(f"/v1/jobs/{j['id']}/runs").raise_for_status().json()["data"] for j in jobs
    }
    records = [line.split() for line in effects.read_text().splitlines()]  # [what, job, run]
    done_runs = {(job, run) for what, job, run in records if what == "done"}
    starts_per_job = Counter(job for what, job, _ in records if what == "start")
    dones_per_job = Counter(job for what, job, _ in records if what == "done")

    problems: list[str] = []
    failed_jobs, lost_by_killed, lost_by_survivor, requeue_lag = [], 0, 0, []
    claimed_by_dead: list[tuple] = []  # (run, worker, seconds after the SIGKILL)
    for j in jobs:
        runs = runs_of[j["id"]]
        statuses = [r["status"] for r in runs]
        completed = [r for r in runs if r["status"] == "completed"]
        if j["attempts"] > j["max_attempts"] or j["max_attempts"] != MAX_ATTEMPTS:
            problems.append(f"{j['id']}: attempts {j['attempts']} of {j['max_attempts']}")
        if [r["attempt"] for r in runs] != list(range(1, j["attempts"] + 1)):
            problems.append(
                f"{j['id']}: run attempts {[r['attempt'] for r in runs]} vs {j['attempts']}"
            )
        if len(completed) > 1:
            problems.append(f"{j['id']}: {len(completed)} completed runs")
        if any(s not in ("completed", "lost") for s in statuses):
            problems.append(f"{j['id']}: unexpected run statuses {statuses}")
        if j["status"] == "completed":
            if statuses[-1:] != ["completed"] or len(completed) != 1:
                problems.append(f"{j['id']}: completed but runs are {statuses}")
            elif (j["id"], str(completed[0]["id"])) not in done_runs:
                problems.append(
                    f"{j['id']}: completed run {completed[0]['id']} left no side effect"
                )
        else:  # failed: only by running out of attempts, every one of them lost
            failed_jobs.append(j["id"])
            err = j["error"] or ""
            if (
                j["attempts"] != j["max_attempts"]
                or set(statuses) != {"lost"}
                or "lost" not in err
                or f"{j['max_attempts']} attempt" not in err
            ):
                problems.append(f"{j['id']}: failed wrongly: {j['attempts']} {statuses} {err!r}")
        for r in runs:
            worker = name_of.get(r["worker_id"], "?")
            if worker in killed_at and r["started_at"] > killed_at[worker]:
                # handed to a worker that was already dead: nobody ran it, the lease must end it
                claimed_by_dead.append(
                    (r["id"], worker, round(r["started_at"] - killed_at[worker], 2))
                )
                if r["status"] != "lost":
                    problems.append(f"run {r['id']} claimed by dead {worker} is {r['status']}")
            if r["status"] == "lost":
                if worker in killed_at:
                    lost_by_killed += 1
                    lag = r["finished_at"] - killed_at[worker]
                    if lag > -1:  # lost around/after the kill (not an earlier lapse)
                        requeue_lag.append(lag)
                else:
                    lost_by_survivor += 1
    # Every side effect comes from a run the server knows for that job.
    run_ids_of = {jid: {str(r["id"]) for r in runs} for jid, runs in runs_of.items()}
    phantom = [(job, run) for _, job, run in records if run not in run_ids_of.get(job, ())]
    if phantom:
        problems.append(f"side effects from unknown runs: {phantom[:5]}")
    # Runs a killed pod was running end lost (by lease expiry), never in progress or completed.
    run_by_id = {r["id"]: r for runs in runs_of.values() for r in runs}
    for rid in sorted(held_at_kill):
        r = run_by_id.get(rid)
        if r is None or r["status"] != "lost" or "lease expired" not in (r["error"] or ""):
            problems.append(f"run {rid} was killed with its pod but is {r and r['status']}: {r}")
    assert not problems, f"{len(problems)} invariant violations:\n" + "\n".join(problems[:30])
    assert len(killed_at) >= MIN_KILLS[backend], (
        f"only {len(killed_at)} kills in {chaos_s:.0f}s of chaos"
    )
    # R1: requeue within ttl + sweep (the sweeper runs every 0.2 s at this lease), plus slack for
    # two loaded cores
    assert requeue_lag and max(requeue_lag) <= LEASE_S + 0.2 + 3, (
        f"requeue after a kill took up to {max(requeue_lag or [0]):.1f}s"
    )

    # -- report ----------------------------------------------------------------------------------
    server_log = (srv.home / "server.log").read_text(errors="replace")
    worker_text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    print(
        f"\n[R1 {backend}] {N_JOBS} jobs, {N_WORKERS} workers, {len(killed_at)} SIGKILLs "
        f"({len(held_at_kill)} hit a running job) in "
        f"{chaos_s:.1f}s of chaos ({time.monotonic() - t_start:.1f}s total); "
        f"completed {sum(j['status'] == 'completed' for j in jobs)}, failed {len(failed_jobs)}; "
        f"runs {sum(len(r) for r in runs_of.values())}: lost by killed pods {lost_by_killed}, "
        f"lost by surviving workers {lost_by_survivor}; jobs started more than once "
        f"{sum(n > 1 for n in starts_per_job.values())}, finished their script more than once "
        f"{sum(n > 1 for n in dones_per_job.values())}; requeue lag after kill max {max(requeue_lag):.2f}s "
        f"mean {sum(requeue_lag) / len(requeue_lag):.2f}s"
    )
    print(
        f"[R1 {backend}] runs claimed by a worker after its SIGKILL: {len(claimed_by_dead)} "
        f"(run, worker, s after the kill): {claimed_by_dead[:10]}"
    )
    for j in sorted(jobs, key=lambda j: -j["attempts"])[:3]:
        print(f"[R1 {backend}] {j['id']} {j['status']} after {j['attempts']} attempt(s):")
        for r in runs_of[j["id"]]:
            w = name_of.get(r["worker_id"], "?")
            k = f"killed at {killed_at[w] - t0:7.2f}" if w in killed_at else "survived"
            end = f"{r['finished_at'] - t0:7.2f}" if r["finished_at"] else "    -  "
            print(
                f"    run {r['id']:5} #{r['attempt']:<2} {r['status']:9} {r['started_at'] - t0:7.2f}"
                f" -> {end}  {w:10} {k}{'  (held at kill)' if r['id'] in held_at_kill else ''}"
            )
    for label, text in (("server", server_log), ("workers", worker_text)):
        bad = _suspicious_lines(text)
        print(f"[R1 {backend}] suspicious {label} log lines: {len(bad)}")
        for hit in bad[:4]:
            print("    " + hit.replace("\n", "\n    "))
    c.close()
