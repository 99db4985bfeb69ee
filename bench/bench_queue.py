"""Queue benchmarks against a real server process: HTTP floor, claim latency, claim throughput,
the raw SQL claim floor, and import / CLI start-up.

    python bench/bench_queue.py                       # both backends (SQLite, then PostgreSQL + S3)
    python bench/bench_queue.py --backend sqlite --out bench/results/queue.json

Results are merged into the JSON file (one key per backend), and a markdown table is printed.
See docs/benchmarks.md for what each figure means and how to read it on a noisy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from time import perf_counter

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    ROOT,
    Server,
    backend,
    cpu_seconds,
    machine,
    ratio,
    status_kb,
    summary_ms,
)

JOB = {"type": "custom", "script": "true", "params": {}}
WORKER = {"name": "bench", "any_hardware": True}
COMPLETE = {"status": "completed", "exit_code": 0}


def client(url: str, token: str | None = None, timeout: float = 60) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout, trust_env=False)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- 1. floor: bare HTTP round trip ----------------------------------------------------------


def sequential_floor(url: str, path: str, token: str | None, n: int, warmup: int = 50) -> dict:
    """`n` GETs one after another on one keep-alive client: latency and request rate."""
    with client(url, token) as c:
        for _ in range(warmup):
            c.get(path).raise_for_status()
        lat = []
        t0 = perf_counter()
        for _ in range(n):
            a = perf_counter()
            r = c.get(path)
            lat.append(perf_counter() - a)
            if r.status_code != 200:
                raise RuntimeError(f"GET {path}: {r.status_code} {r.text[:200]}")
        elapsed = perf_counter() - t0
    return {**summary_ms(lat), "req_per_s": round(n / elapsed, 1)}


# -- 2. pending job -> claimed by an idle long-polling worker ---------------------------------


def claim_latency(
    url: str, token: str, n: int, warmup: int = 10, idle_s: float = 0.03, fused: bool = True
) -> dict:
    """A worker thread long-polls claim(wait_s=30); the main thread creates a job and we time
    from just before the create request is sent to the claim response arriving. With `fused`
    (what `ow worker` does) each claim carries the previous run's completion as `done`."""
    tag = uuid.uuid4().hex[:8]
    with client(url, token) as main:
        r = main.post("/v1/workers", json={**WORKER, "name": "bench-latency"})
        r.raise_for_status()
        wid = r.json()["id"]
        ready: queue.Queue[float] = queue.Queue()
        got: queue.Queue[tuple[float, dict | None, str | None]] = queue.Queue()
        stop = threading.Event()

        def worker() -> None:
            done: dict | None = None
            with client(url, token) as c:
                while True:
                    ready.put(perf_counter())
                    req: dict = {"wait_s": 30} if done is None else {"wait_s": 30, "done": done}
                    try:
                        r = c.post(f"/v1/workers/{wid}/claim", json=req)
                    except httpx.HTTPError as e:
                        got.put((perf_counter(), None, repr(e)))
                        return
                    t = perf_counter()
                    if r.status_code in (200, 204):
                        done = None
                    if r.status_code == 204:
                        got.put((t, None, "204"))
                    elif r.status_code != 200:
                        got.put((t, None, f"{r.status_code} {r.text[:200]}"))
                        return
                    else:
                        body = r.json()
                        got.put((t, body, None))
                        if fused:
                            done = {"run_id": body["run"]["id"], **COMPLETE}
                            continue
                        rc = c.post(f"/v1/runs/{body['run']['id']}/complete", json=COMPLETE)
                        if rc.status_code != 200:
                            got.put(
                                (perf_counter(), None, f"complete {rc.status_code} {rc.text[:200]}")
                            )
                            return
                    if stop.is_set():
                        return

        th = threading.Thread(target=worker, daemon=True)
        th.start()
        total, create_rtt, after_create, errors, floor = [], [], [], [], []
        for i in range(warmup + n):
            ready.get(timeout=60)  # the worker is about to send its claim ...
            time.sleep(idle_s)  # ... let it reach the server and park in the long-poll
            # The floor, interleaved: one bare round trip on the same client and connection,
            # after the same idle gap as the create below (a wake-up from idle costs both alike).
            a = perf_counter()
            main.get("/health").raise_for_status()
            if i >= warmup:
                floor.append(perf_counter() - a)
            time.sleep(idle_s)
            if i == warmup + n - 1:
                stop.set()
            t0 = perf_counter()
            r = main.post("/v1/jobs", json={**JOB, "job_id_suffix": f"lat-{tag}-{i}"})
            t1 = perf_counter()
            r.raise_for_status()
            t2, body, err = got.get(timeout=60)
            if err or body is None or body["job"]["id"] != r.json()["id"]:
                errors.append(err or "claimed another job")
                if len(errors) > 5:
                    break
                continue
            if i >= warmup:
                total.append(t2 - t0)
                create_rtt.append(t1 - t0)
                after_create.append(t2 - t1)
        th.join(timeout=35)
    return {
        "n": len(total),
        "idle_before_create_s": idle_s,
        "floor_interleaved": summary_ms(floor),
        "latency": summary_ms(total),
        "create_round_trip": summary_ms(create_rtt),
        "latency_minus_create_rtt": summary_ms(after_create),
        "errors": errors,
    }


# -- 3. claims per second through the API ----------------------------------------------------


def create_jobs(
    url: str, token: str, n: int, tag: str, threads: int = 4
) -> tuple[list[str], float]:
    ids: list[list[str]] = [[] for _ in range(threads)]

    def loop(k: int) -> None:
        with client(url, token) as c:
            for i in range(k, n, threads):
                r = c.post("/v1/jobs", json={**JOB, "job_id_suffix": f"tp-{tag}-{i}"})
                r.raise_for_status()
                ids[k].append(r.json()["id"])

    t0 = perf_counter()
    ts = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return [i for part in ids for i in part], perf_counter() - t0


def db_job_states(db_url: str, ids: set[str]) -> dict[str, tuple[str, int, int]]:
    """job id -> (status, runs, completed runs), read straight from the server's database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT j.id, j.status, COUNT(r.id), "
                    "SUM(CASE WHEN r.status = 'completed' THEN 1 ELSE 0 END) "
                    "FROM jobs j LEFT JOIN runs r ON r.job_pk = j.pk GROUP BY j.pk, j.id, j.status"
                )
            ).all()
    finally:
        engine.dispose()
    return {jid: (st, int(nr), int(nc or 0)) for jid, st, nr, nc in rows if jid in ids}


def claim_throughput(
    srv: Server,
    db_url: str,
    token: str,
    workers: int,
    n_jobs: int,
    phase_s: float = 0.4,
    fused: bool = True,
) -> dict:
    """W worker threads drain `n_jobs` pending jobs (claim(wait_s=0) -> complete), in phases of
    `phase_s` that alternate with phases in which the same threads, on the same clients and
    connections, GET /health: the floor is measured interleaved with the series, under the
    same load of the machine, with the same client concurrency. Phases never overlap (barriers).
    With `fused` (what `ow worker` does) a run's completion rides with the worker's next claim
    (`done`): one request per job; without, each job is a claim and a complete request."""
    url = srv.url
    tag = uuid.uuid4().hex[:8]
    ids, create_s = create_jobs(url, token, n_jobs, tag)
    with client(url, token) as c:
        wids = []
        for i in range(workers):
            r = c.post("/v1/workers", json={**WORKER, "name": f"bench-tp-{workers}-{i}"})
            r.raise_for_status()
            wids.append(r.json()["id"])

    go = threading.Barrier(workers + 1)
    done_phase = threading.Barrier(workers + 1)
    phase = ["health"]
    phase_end = [0.0]
    claimed: list[list[str]] = [[] for _ in range(workers)]
    claim_lat: list[list[float]] = [[] for _ in range(workers)]
    complete_lat: list[list[float]] = [[] for _ in range(workers)]
    health_lat: list[list[float]] = [[] for _ in range(workers)]
    requests = [0] * workers
    spurious_empty = [0] * workers
    errors: list[str] = []
    total = [0]
    total_lock = threading.Lock()
    give_up_at = [perf_counter() + 300]
    pending_done: list[dict | None] = [None] * workers  # the completion the next claim carries

    def drained() -> bool:
        with total_lock:
            return total[0] >= n_jobs

    def claims(k: int, c: httpx.Client) -> None:
        while perf_counter() < phase_end[0]:
            a = perf_counter()
            req: dict = {"wait_s": 0}
            if pending_done[k] is not None:
                req["done"] = pending_done[k]
            r = c.post(f"/v1/workers/{wids[k]}/claim", json=req)
            b = perf_counter()
            requests[k] += 1
            if r.status_code in (200, 204):
                pending_done[k] = None
            if r.status_code == 204:
                # "Nothing pending" is only believed once every job of the batch was claimed:
                # an empty answer while jobs are still pending is counted, and retried.
                if drained() or b > give_up_at[0]:
                    return
                spurious_empty[k] += 1
                continue
            if r.status_code != 200:
                errors.append(f"claim {r.status_code} {r.text[:200]}")
                return
            body = r.json()
            with total_lock:
                total[0] += 1
            claimed[k].append(body["job"]["id"])
            claim_lat[k].append(b - a)
            if fused:
                pending_done[k] = {"run_id": body["run"]["id"], **COMPLETE}
                continue
            rc = c.post(f"/v1/runs/{body['run']['id']}/complete", json=COMPLETE)
            complete_lat[k].append(perf_counter() - b)
            requests[k] += 1
            if rc.status_code != 200:
                errors.append(f"complete {rc.status_code} {rc.text[:200]}")

    def loop(k: int) -> None:
        with client(url, token) as c:
            c.get("/health")  # open the connection before the clock starts
            while True:
                go.wait()
                if phase[0] == "stop":
                    if pending_done[k] is not None:  # not timed: the batch is drained
                        d = pending_done[k]
                        rc = c.post(f"/v1/runs/{d['run_id']}/complete", json=COMPLETE)
                        if rc.status_code != 200:
                            errors.append(f"complete {rc.status_code} {rc.text[:200]}")
                    return
                if phase[0] == "health":
                    while perf_counter() < phase_end[0]:
                        a = perf_counter()
                        r = c.get("/health")
                        health_lat[k].append(perf_counter() - a)
                        if r.status_code != 200:
                            errors.append(f"health {r.status_code}")
                elif not errors:
                    claims(k, c)
                done_phase.wait()

    ts = [threading.Thread(target=loop, args=(k,)) for k in range(workers)]
    for t in ts:
        t.start()
    spent = {"health": [0.0, 0.0, 0.0], "claims": [0.0, 0.0, 0.0]}  # wall, server CPU, client CPU
    phases = 0
    while not drained() and not errors and perf_counter() < give_up_at[0]:
        for name in ("health", "claims"):
            phase[0] = name
            cpu0, pcpu0 = cpu_seconds(srv.pid), time.process_time()
            t0 = perf_counter()
            phase_end[0] = t0 + phase_s
            go.wait()
            done_phase.wait()
            sp = spent[name]
            sp[0] += perf_counter() - t0
            sp[1] += cpu_seconds(srv.pid) - cpu0
            sp[2] += time.process_time() - pcpu0
        phases += 1
    phase[0] = "stop"
    go.wait()
    for t in ts:
        t.join()
    elapsed, server_cpu, client_cpu = spent["claims"]
    h_wall, h_cpu, h_client = spent["health"]
    n_health = sum(len(x) for x in health_lat)

    all_claimed = [j for part in claimed for j in part]
    batch = set(ids)
    states = db_job_states(db_url, batch)
    dup = sum(n - 1 for n in Counter(all_claimed).values() if n > 1)
    foreign = sum(1 for j in all_claimed if j not in batch)
    not_completed = sum(1 for j in batch if states.get(j, ("missing",))[0] != "completed")
    not_one_run = sum(1 for j in batch if j not in states or states[j][1] != 1 or states[j][2] != 1)
    n_claims = len(all_claimed)
    health_rps = n_health / h_wall if h_wall else None
    return {
        "workers": workers,
        "completion": "with the next claim" if fused else "separate request",
        "phases": phases,
        "phase_s": phase_s,
        # the floor of this run: the same threads GET /health in the phases between
        "floor_interleaved": {
            "requests": n_health,
            "wall_s": round(h_wall, 3),
            "req_per_s": round(health_rps, 1) if health_rps else None,
            "request": summary_ms([x for part in health_lat for x in part]),
            "server_cpu_ms_per_request": round(1000 * h_cpu / max(n_health, 1), 3),
            "client_cpu_ms_per_request": round(1000 * h_client / max(n_health, 1), 3),
        },
        "jobs": n_jobs,
        "create_jobs_s": round(create_s, 2),
        "create_jobs_per_s": round(n_jobs / create_s, 1),
        "elapsed_s": round(elapsed, 3),
        "claims": n_claims,
        "claims_per_s": round(n_claims / elapsed, 1),
        "claim_complete_pairs_per_s": round(n_claims / elapsed, 1),
        "api_requests": sum(requests),
        "api_requests_per_s": round(sum(requests) / elapsed, 1),
        "claim_request": summary_ms([x for part in claim_lat for x in part]),
        # none when the completions ride with the claims
        "complete_request": summary_ms([x for part in complete_lat for x in part])
        if not fused
        else {"p50_ms": None},
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_ms_per_pair": round(1000 * server_cpu / max(n_claims, 1), 3),
        "server_cpu_util": round(server_cpu / elapsed, 2),
        "client_cpu_s": round(client_cpu, 2),
        "client_cpu_ms_per_pair": round(1000 * client_cpu / max(n_claims, 1), 3),
        "per_worker_claims": [len(part) for part in claimed],
        # claim answered 204 (nothing pending) while jobs of the batch were still pending
        "spurious_empty_claims": sum(spurious_empty),
        "violations": {
            "duplicate_claims": dup,
            "claims_outside_batch": foreign,
            "jobs_not_completed": not_completed,
            "jobs_without_exactly_one_completed_run": not_one_run,
            "request_errors": len(errors),
            "total": dup + foreign + not_completed + not_one_run + len(errors),
        },
        "error_samples": errors[:5],
    }


# -- 4. raw SQL claim floor (in-process, same store functions) --------------------------------


def raw_claim_floor(db_url: str, n: int) -> dict:
    from openweights import types as t
    from openweights.store import jobs as q
    from openweights.store import orgs
    from openweights.store.db import Database

    db = Database(db_url)
    db.migrate()
    sk = not db.is_sqlite
    try:
        with db.write() as conn:
            now = db.now(conn)
            org = orgs.create_org(conn, "raw", now)
            q.register_worker(
                conn, org["id"], t.WorkerRegister(name="raw", any_hardware=True), None, now
            )
        with db.read() as conn:
            worker = q.list_workers(conn, org["id"])[0]

        def fill(tag: str) -> float:
            t0 = perf_counter()
            with db.write() as conn:
                now = db.now(conn)
                for i in range(n):
                    req = t.JobCreateParams(**JOB, job_id_suffix=f"{tag}-{i}")
                    q.create_job(conn, org["id"], req, now + i * 1e-6, 3, lock=sk)
            return perf_counter() - t0

        # (a) claim only: one write transaction per claim, exactly as the store offers it
        fill("a")
        k, t0 = 0, perf_counter()
        while True:
            with db.write() as conn:
                c = q.claim(conn, worker, db.now(conn), 30.0, skip_locked=sk)
            if c is None:
                break
            k += 1
        claim_s = perf_counter() - t0

        # (b) claim + complete: the store side of the API's claim and complete routes
        # (worker lookup + touch + claim + secrets; live_run + finish_run + log cleanup),
        # without the HTTP layer, auth, and the log-file persistence of the complete route.
        fill("b")
        k2, t0 = 0, perf_counter()
        while True:
            with db.write() as conn:
                w = q.get_worker(conn, org["id"], worker["id"])
                now = db.now(conn)
                q.touch_worker(conn, worker["id"], now)
                c = q.claim(conn, w, now, 30.0, skip_locked=sk)
                if c is not None:
                    orgs.secret_env(conn, org["id"], None)  # no secrets: the box is not used
            if c is None:
                break
            with db.write() as conn:
                now = db.now(conn)
                run, job = q.live_run(conn, org["id"], c.run["id"], now, check_lease=False)
                q.finish_run(conn, run, job, status="completed", now=now, exit_code=0)
                q.delete_log_chunks(conn, c.run["id"])
            k2 += 1
        pair_s = perf_counter() - t0
    finally:
        db.dispose()
    return {
        "jobs": n,
        "claims": k,
        "claims_per_s": round(k / claim_s, 1),
        "claim_complete_pairs": k2,
        "claim_complete_pairs_per_s": round(k2 / pair_s, 1),
    }


# -- 5. import / CLI start-up ----------------------------------------------------------------


def startup_times(runs: int = 10) -> dict:
    """Median wall time of fresh processes, in two set-ups:

    - `bytecode_cache`: `PYTHONDONTWRITEBYTECODE` unset and `PYTHONPYCACHEPREFIX` pointing at a
      temporary directory (filled by one warm-up run), i.e. what a normal install sees;
    - `as_configured`: this shell's environment as it is (here `PYTHONDONTWRITEBYTECODE=1` with an
      editable install: openweights' own modules are compiled from source on every start).
    """
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHTS_")}
    cwd = tempfile.mkdtemp(prefix="ow-bench-import-")
    cached_env = {k: v for k, v in base_env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cached_env["PYTHONPYCACHEPREFIX"] = str(Path(cwd) / "pycache")
    # The entry point next to this interpreter, not a pyenv shim (a shell script that adds its
    # own start-up cost, which is not openweights').
    ow = Path(sys.executable).parent / "ow"
    ow_cmd = [str(ow)] if ow.exists() else ([shutil.which("ow")] if shutil.which("ow") else None)
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import openweights": [sys.executable, "-c", "import openweights"],
        "from openweights import OpenWeights": [
            sys.executable,
            "-c",
            "from openweights import OpenWeights",
        ],
        # what the SDK cannot avoid: its HTTP client and its models (a reference, not a target)
        "import httpx, pydantic, pydantic_settings": [
            sys.executable,
            "-c",
            "import httpx, pydantic, pydantic_settings",
        ],
        "ow --help": (ow_cmd + ["--help"]) if ow_cmd else None,
    }
    out: dict[str, dict] = {
        "env": {
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
            "ow_entry_point": ow_cmd[0] if ow_cmd else None,
        }
    }
    try:
        for variant, env in (("bytecode_cache", cached_env), ("as_configured", base_env)):
            res: dict[str, dict] = {}
            times: dict[str, list[float]] = {name: [] for name, argv in cases.items() if argv}
            for name, argv in cases.items():
                if argv is None:
                    res[name] = {"ok": False, "note": "no `ow` entry point installed"}
            # Round-robin over the commands, so that a change in the machine's load during the
            # measurement hits all of them alike; the first round warms caches and is dropped.
            for i in range(runs + 1):
                for name in list(times):
                    t0 = perf_counter()
                    p = subprocess.run(
                        cases[name], cwd=cwd, env=env, capture_output=True, text=True
                    )
                    dt = perf_counter() - t0
                    if p.returncode != 0:
                        err = (p.stderr or p.stdout).strip().splitlines()[-1:]
                        res[name] = {
                            "ok": False,
                            "note": f"exit {p.returncode}: {' '.join(err)[:300]}",
                        }
                        del times[name]
                    elif i:
                        times[name].append(dt)
            for name, ts in times.items():
                res[name] = {
                    "ok": True,
                    "median_s": round(statistics.median(ts), 4),
                    "min_s": round(min(ts), 4),
                    "runs": runs,
                }
            res = {name: res[name] for name in cases}
            base = res["python -c pass"].get("median_s")
            for v in res.values():
                if v.get("ok") and base is not None:
                    v["delta_vs_pass_s"] = round(v["median_s"] - base, 4)
            out[variant] = res
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    return out


# -- driver ----------------------------------------------------------------------------------

# Sized so that one backend takes under ~2 minutes on the shared 2-core machine (see docs/benchmarks.md).
DEFAULT_JOBS = {"sqlite": 300, "postgres": 150}
DEFAULT_RAW_JOBS = {"sqlite": 500, "postgres": 300}


def run_backend(name: str, args: argparse.Namespace) -> dict:
    n_jobs = args.jobs or DEFAULT_JOBS[name]
    raw_jobs = args.raw_jobs or DEFAULT_RAW_JOBS[name]
    t_start = perf_counter()
    res: dict = {"backend": name, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    fused = args.complete == "with-claim"
    res["completion"] = "with the next claim" if fused else "separate request"
    phases: dict[str, float] = {}
    res["phase_s"] = phases
    mark = [perf_counter()]

    def lap(phase: str) -> None:
        now = perf_counter()
        phases[phase] = round(now - mark[0], 1)
        mark[0] = now

    res["pg_claim"] = args.pg_claim if name == "postgres" else None
    with backend(name) as be:
        if args.pg_claim == "python":
            be.extra_env["OPENWEIGHTS_PG_CLAIM_FUNCTION"] = "0"
        srv = be.start_server()
        lap("start_backend_and_server")
        try:
            token = srv.signup()
            db_url = (
                srv.env.get("OPENWEIGHTS_DATABASE_URL")
                or f"sqlite:///{srv.home / 'openweights.db'}"
            )
            if db_url.startswith("postgresql://"):
                db_url = db_url.replace("postgresql://", "postgresql+psycopg://", 1)

            log(f"{name}: HTTP floor")
            cpu0 = cpu_seconds(srv.pid)
            health = sequential_floor(srv.url, "/health", None, args.floor_requests)
            # server CPU per request (warm-up included): less sensitive to the machine's load
            # than a rate, since other processes' load slows the floor and the queue alike only
            # in wall time
            health["server_cpu_ms_per_request"] = round(
                1000 * (cpu_seconds(srv.pid) - cpu0) / (args.floor_requests + 50), 3
            )
            res["floor"] = {
                "health": health,
                "me": sequential_floor(srv.url, "/v1/me", token, args.floor_requests),
            }
            lap("floor")
            log(f"{name}: claim latency ({args.latency_n} jobs)")
            lat = claim_latency(srv.url, token, args.latency_n, fused=fused)
            h50, m50 = res["floor"]["health"]["p50_ms"], res["floor"]["me"]["p50_ms"]
            # the target's ratio: against the /health round trips interleaved with the samples
            lat["ratio_p50_vs_interleaved_health_p50"] = ratio(
                lat["latency"]["p50_ms"], lat["floor_interleaved"]["p50_ms"]
            )
            lat["ratio_p50_vs_health_p50"] = ratio(lat["latency"]["p50_ms"], h50)
            lat["ratio_p50_vs_me_p50"] = ratio(lat["latency"]["p50_ms"], m50)
            lat["ratio_p99_vs_health_p50"] = ratio(lat["latency"]["p99_ms"], h50)
            lat["ratio_p50_minus_create_vs_health_p50"] = ratio(
                lat["latency_minus_create_rtt"]["p50_ms"], h50
            )
            res["claim_latency"] = lat
            lap("claim_latency")

            res["throughput"] = {}
            for w in args.workers:
                log(f"{name}: claim throughput, {w} worker(s), {n_jobs} jobs")
                tp = claim_throughput(srv, db_url, token, w, n_jobs, args.phase_s, fused=fused)
                floor_1 = res["floor"]["health"]["req_per_s"]
                floor_w = tp["floor_interleaved"]["req_per_s"]  # same threads, same run
                tp["ratio_claims_vs_health_rps_1client"] = ratio(tp["claims_per_s"], floor_1)
                tp["ratio_requests_vs_health_rps_1client"] = ratio(
                    tp["api_requests_per_s"], floor_1
                )
                tp["ratio_claims_vs_health_rps_same_threads"] = ratio(tp["claims_per_s"], floor_w)
                tp["ratio_requests_vs_health_rps_same_threads"] = ratio(
                    tp["api_requests_per_s"], floor_w
                )
                # a claim+complete pair is two requests: at the same server CPU per request as
                # /health, this ratio is 1 (and claims/s would be 0.5 x the /health rate)
                tp["ratio_pair_cpu_vs_two_health_requests"] = ratio(
                    2 * tp["floor_interleaved"]["server_cpu_ms_per_request"],
                    tp["server_cpu_ms_per_pair"],
                )
                tp["ratio_pair_client_cpu_vs_two_health_requests"] = ratio(
                    2 * tp["floor_interleaved"]["client_cpu_ms_per_request"],
                    tp["client_cpu_ms_per_pair"],
                )
                res["throughput"][str(w)] = tp
                log(f"  {tp['claims_per_s']} claims/s, violations {tp['violations']['total']}")
                lap(f"throughput_{w}")
            res["server_peak_rss_mib"] = round((_vm_hwm(srv.pid) or 0) / 1024, 1)
        finally:
            srv.stop()
        log(f"{name}: raw SQL claim floor ({raw_jobs} jobs)")
        res["raw_sql"] = raw_claim_floor(be.fresh_database_url(), raw_jobs)
        lap("raw_sql")
    for tp in res["throughput"].values():
        tp["ratio_claims_vs_raw_sql_claims"] = ratio(
            tp["claims_per_s"], res["raw_sql"]["claims_per_s"]
        )
        tp["ratio_pairs_vs_raw_sql_pairs"] = ratio(
            tp["claim_complete_pairs_per_s"], res["raw_sql"]["claim_complete_pairs_per_s"]
        )
    res["wall_s"] = round(perf_counter() - t_start, 1)
    return res


def _vm_hwm(pid: int) -> int | None:
    return status_kb(pid, "VmHWM")


def fmt(v, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def summary_of(r: dict) -> dict:
    """The figures the targets are about, of one run."""
    f, lat = r["floor"], r["claim_latency"]
    out = {
        "measured_at": r.get("measured_at"),
        "loadavg_at_start": r.get("loadavg_at_start"),
        "health_p50_ms": f["health"]["p50_ms"],
        "health_req_per_s": f["health"]["req_per_s"],
        "health_server_cpu_ms": f["health"].get("server_cpu_ms_per_request"),
        "latency_p50_ms": lat["latency"]["p50_ms"],
        "latency_p99_ms": lat["latency"]["p99_ms"],
        "latency_floor_p50_ms": lat["floor_interleaved"]["p50_ms"],
        "latency_ratio_p50": lat["ratio_p50_vs_interleaved_health_p50"],
        "latency_ratio_p50_vs_sequential_floor": lat["ratio_p50_vs_health_p50"],
        "raw_sql_claims_per_s": r["raw_sql"]["claims_per_s"],
    }
    for w, tp in r["throughput"].items():
        out[f"claims_per_s_{w}"] = tp["claims_per_s"]
        out[f"floor_rps_{w}"] = tp["floor_interleaved"]["req_per_s"]
        out[f"claims_ratio_{w}"] = tp["ratio_claims_vs_health_rps_same_threads"]
        out[f"claims_ratio_1client_{w}"] = tp["ratio_claims_vs_health_rps_1client"]
        out[f"client_cpu_ratio_{w}"] = tp.get("ratio_pair_client_cpu_vs_two_health_requests")
        out[f"server_cpu_ms_per_pair_{w}"] = tp["server_cpu_ms_per_pair"]
        out[f"cpu_ratio_{w}"] = tp.get("ratio_pair_cpu_vs_two_health_requests")
        out[f"violations_{w}"] = tp["violations"]["total"]
    return out


def _spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med, 2)
    return f"{fmt(med, 2)} [{fmt(min(values), 2)}–{fmt(max(values), 2)}]"


def markdown_repeats(results: dict) -> str:
    """Median [min–max] over the repeated runs of each backend."""
    lines: list[str] = []
    for name, r in results.get("backends", {}).items():
        reps = r.get("repeats") or []
        if len(reps) < 2:
            continue
        ws = [k.removeprefix("claims_per_s_") for k in reps[0] if k.startswith("claims_per_s_")]
        lines.append(f"#### {name}: {len(reps)} runs, median [min–max]\n")
        lines.append("| measure | value |")
        lines.append("|---|---|")
        rows = [
            ("load average at start (1 min)", [x["loadavg_at_start"][0] for x in reps]),
            ("`GET /health` p50 ms", [x["health_p50_ms"] for x in reps]),
            ("`GET /health` req/s (1 client)", [x["health_req_per_s"] for x in reps]),
            ("server CPU ms per `GET /health`", [x.get("health_server_cpu_ms") for x in reps]),
            ("pending → claimed p50 ms", [x["latency_p50_ms"] for x in reps]),
            ("pending → claimed p99 ms", [x["latency_p99_ms"] for x in reps]),
            (
                "`GET /health` p50 ms, interleaved with the latency samples",
                [x.get("latency_floor_p50_ms") for x in reps],
            ),
            (
                "**pending → claimed p50 ÷ interleaved health p50** (target ≤ 3)",
                [x["latency_ratio_p50"] for x in reps],
            ),
            (
                "pending → claimed p50 ÷ sequential health p50",
                [x.get("latency_ratio_p50_vs_sequential_floor") for x in reps],
            ),
        ]
        for w in ws:
            rows.append((f"claims/s, {w} worker(s)", [x[f"claims_per_s_{w}"] for x in reps]))
            rows.append(
                (
                    f"`GET /health` req/s, same {w} thread(s), interleaved",
                    [x.get(f"floor_rps_{w}") for x in reps],
                )
            )
            rows.append(
                (
                    f"**claims/s ÷ interleaved health req/s, {w} worker(s)** (target ≥ 0.5)",
                    [x[f"claims_ratio_{w}"] for x in reps],
                )
            )
            rows.append(
                (
                    f"claims/s ÷ sequential 1-client health req/s, {w} worker(s)",
                    [x.get(f"claims_ratio_1client_{w}") for x in reps],
                )
            )
            rows.append(
                (
                    f"2 × client CPU of `/health` ÷ client CPU of a claim+complete, {w} worker(s)",
                    [x.get(f"client_cpu_ratio_{w}") for x in reps],
                )
            )
            rows.append(
                (
                    f"2 × CPU of `/health` ÷ CPU of a claim+complete, {w} worker(s) (1 = parity)",
                    [x.get(f"cpu_ratio_{w}") for x in reps],
                )
            )
            rows.append(
                (
                    f"server CPU ms per claim+complete, {w} worker(s)",
                    [x[f"server_cpu_ms_per_pair_{w}"] for x in reps],
                )
            )
        rows.append(
            ("raw SQL claims/s (in-process floor)", [x["raw_sql_claims_per_s"] for x in reps])
        )
        viol = sum(x[f"violations_{w}"] for x in reps for w in ws)
        for label, vals in rows:
            lines.append(f"| {label} | {_spread(vals)} |")
        lines.append(f"| violations (all runs) | {viol} |\n")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    lines: list[str] = []
    add = lines.append
    for name, r in results.get("backends", {}).items():
        f, lat = r["floor"], r["claim_latency"]
        add(f"### {name}\n")
        add("| measure | p50 ms | p99 ms | req/s | ratio |")
        add("|---|---:|---:|---:|---|")
        add(
            f"| floor: `GET /health`, 1 keep-alive client | {fmt(f['health']['p50_ms'], 3)} | "
            f"{fmt(f['health']['p99_ms'], 3)} | {fmt(f['health']['req_per_s'])} | 1× |"
        )
        add(
            f"| floor: `GET /v1/me` (auth + 1 read) | {fmt(f['me']['p50_ms'], 3)} | {fmt(f['me']['p99_ms'], 3)} | "
            f"{fmt(f['me']['req_per_s'])} | p50 {fmt(ratio(f['me']['p50_ms'], f['health']['p50_ms']), 2)}× health |"
        )
        for w, tp in r["throughput"].items():
            fi = tp["floor_interleaved"]
            add(
                f"| floor: `GET /health`, {w} client thread(s), interleaved with the {w}-worker run | "
                f"{fmt(fi['request']['p50_ms'], 3)} | {fmt(fi['request']['p99_ms'], 3)} | {fmt(fi['req_per_s'])} | |"
            )
        fl = lat["floor_interleaved"]
        add(
            f"| floor: `GET /health` interleaved with the latency samples (same idle gap before) | "
            f"{fmt(fl['p50_ms'], 3)} | {fmt(fl['p99_ms'], 3)} | | 1× for the latency |"
        )
        add(
            f"| pending job → claimed by idle long-polling worker (n={lat['n']}) | {fmt(lat['latency']['p50_ms'], 3)} | "
            f"{fmt(lat['latency']['p99_ms'], 3)} | | p50 **{fmt(lat['ratio_p50_vs_interleaved_health_p50'], 2)}×** "
            f"interleaved health p50 (target ≤ 3×); {fmt(lat['ratio_p50_vs_health_p50'], 2)}× sequential health p50; "
            f"{fmt(lat['ratio_p50_vs_me_p50'], 2)}× /v1/me p50 |"
        )
        add(
            f"| … of which the create request's round trip | {fmt(lat['create_round_trip']['p50_ms'], 3)} | "
            f"{fmt(lat['create_round_trip']['p99_ms'], 3)} | | |"
        )
        add(
            f"| … latency − create round trip | {fmt(lat['latency_minus_create_rtt']['p50_ms'], 3)} | "
            f"{fmt(lat['latency_minus_create_rtt']['p99_ms'], 3)} | | "
            f"p50 {fmt(lat['ratio_p50_minus_create_vs_health_p50'], 2)}× health p50 |"
        )
        add("")
        add(
            "| workers | jobs | claims/s | API req/s (claim+complete) | **claims/s ÷ interleaved health req/s (same threads)** | "
            "claims/s ÷ health req/s (1 client, sequential) | claims/s ÷ raw SQL claims/s | "
            "pairs/s ÷ raw SQL pairs/s | claim p50 / complete p50 ms | server CPU ms/pair (÷ 2 × /health) | "
            "client CPU ms/pair (÷ 2 × /health) | 204s while jobs pending | violations |"
        )
        add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for w, tp in r["throughput"].items():
            fi = tp["floor_interleaved"]
            add(
                f"| {w} | {tp['jobs']} | {fmt(tp['claims_per_s'])} | {fmt(tp['api_requests_per_s'])} | "
                f"**{fmt(tp['ratio_claims_vs_health_rps_same_threads'], 2)}** | "
                f"{fmt(tp['ratio_claims_vs_health_rps_1client'], 2)} | "
                f"{fmt(tp.get('ratio_claims_vs_raw_sql_claims'), 3)} | {fmt(tp.get('ratio_pairs_vs_raw_sql_pairs'), 3)} | "
                f"{fmt(tp['claim_request']['p50_ms'], 2)} / {fmt(tp['complete_request']['p50_ms'], 2)} | "
                f"{fmt(tp['server_cpu_ms_per_pair'], 2)} ({fmt(ratio(tp['server_cpu_ms_per_pair'], 2 * fi['server_cpu_ms_per_request']), 2)}×) | "
                f"{fmt(tp.get('client_cpu_ms_per_pair'), 2)} ({fmt(ratio(tp.get('client_cpu_ms_per_pair'), 2 * fi['client_cpu_ms_per_request']), 2)}×) | "
                f"{fmt(tp.get('spurious_empty_claims'))} | "
                f"{tp['violations']['total']} |"
            )
        raw = r["raw_sql"]
        add("")
        add(
            f"Raw SQL floor (in-process, same store functions, 1 thread, fresh {name} database, {raw['jobs']} jobs): "
            f"**{fmt(raw['claims_per_s'])} claims/s** (`jobs.claim` only), "
            f"**{fmt(raw['claim_complete_pairs_per_s'])} claim+complete pairs/s**."
        )
        add(
            f"Server peak RSS {fmt(r.get('server_peak_rss_mib'))} MiB; load average at start "
            f"{r.get('loadavg_at_start')}; wall time {fmt(r.get('wall_s'))} s.\n"
        )
    imp = results.get("startup")
    if imp:
        add("### start-up (median of 10 fresh processes)\n")
        add(
            "| command | median s (bytecode cache) | Δ vs `python -c pass` | median s (as configured: no .pyc written) | Δ vs `python -c pass` | target Δ ≤ 0.3 s |"
        )
        add("|---|---:|---:|---:|---:|---|")
        cached, raw = imp.get("bytecode_cache", {}), imp.get("as_configured", {})
        for k in cached:
            a, b = cached[k], raw.get(k, {})
            if a.get("ok"):
                d = a.get("delta_vs_pass_s")
                ok = (
                    ""
                    if k == "python -c pass" or k.startswith("import httpx")
                    else ("met" if d is not None and d <= 0.3 else "missed")
                )
                add(
                    f"| `{k}` | {fmt(a['median_s'], 3)} | {fmt(d, 3)} | {fmt(b.get('median_s'), 3)} | "
                    f"{fmt(b.get('delta_vs_pass_s'), 3)} | {ok} |"
                )
            else:
                add(f"| `{k}` | failed | | | | {a.get('note')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "queue.json"))
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="pending jobs per throughput run (default 300 SQLite, 150 PostgreSQL)",
    )
    ap.add_argument("--raw-jobs", type=int, default=None, help="jobs for the raw SQL floor")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--floor-requests", type=int, default=500)
    ap.add_argument(
        "--phase-s",
        type=float,
        default=0.4,
        help="seconds per phase of a throughput run (claims and the /health floor alternate)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per backend (a fresh server each); medians and spread of the ratios are printed",
    )
    ap.add_argument(
        "--complete",
        choices=["with-claim", "separate"],
        default="with-claim",
        help="how a worker reports a run's end: with its next claim (`done`, what `ow worker` "
        "does: one request per job) or as its own POST /v1/runs/{id}/complete",
    )
    ap.add_argument(
        "--pg-claim",
        choices=["function", "python"],
        default="function",
        help="PostgreSQL: a claim as one call of the database function ow_claim_v1 (default) or "
        "as the server's statements one by one (OPENWEIGHTS_PG_CLAIM_FUNCTION=0)",
    )
    ap.add_argument("--no-startup", action="store_true", help="skip the import / CLI timings")
    ap.add_argument("--startup-only", action="store_true", help="only the import / CLI timings")
    args = ap.parse_args(argv)

    out = Path(args.out)
    results: dict = {}
    if out.exists():
        try:
            results = json.loads(out.read_text())
        except (OSError, ValueError):
            results = {}
    results["machine"] = machine()
    results.setdefault("backends", {})
    names = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    for name in [] if args.startup_only else names:
        repeats = []
        for i in range(args.repeat):
            if args.repeat > 1:
                log(f"{name}: run {i + 1} of {args.repeat}")
            r = run_backend(name, args)
            r["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            repeats.append(summary_of(r))
        r["repeats"] = repeats  # the last run in full, every run in brief
        results["backends"][name] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_startup:
        log("start-up times")
        results["startup"] = startup_times()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(markdown_repeats(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
