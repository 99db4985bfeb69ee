"""Dashboard page load with 10,000 jobs and 100,000 events in one run, on a real server process.

    python bench/bench_dashboard.py                                  # SQLite, 10k jobs, 100k events
    python bench/bench_dashboard.py --jobs 10000 --events 100000 --out bench/results/dashboard.json
    python bench/bench_dashboard.py --browser     # also: time until the plots page has drawn

The org's jobs, their runs (9 in 10 jobs ran once, on priced pods, so the cost page sums 9,000
runs), workers and one run's events are written straight into a fresh database (store functions
and table inserts, before the server starts). Then each page is fetched `--repeat` times over HTTP
with a session cookie (client time: request to last byte). Floors measured in the same run:
`GET /health` (no auth, no database) and `GET /dashboard/login` (a trivial template, no
database); each page is also reported as a ratio to the `/health` floor. The first load of a
metric series is timed separately (it reads every event once; later loads read only new ones).
`--browser` also loads the plots page in chromium and times until every chart is drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from time import perf_counter

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ServerProcess, clean_env, ratio, summary_ms  # noqa: E402

PRICED = "1x A100"


def seed(home: Path, n_jobs: int, n_events: int) -> dict:
    """Write the org's data; returns the ids the pages need."""
    from sqlalchemy import insert, update

    from openweights._settings import Settings
    from openweights.store import jobs as q
    from openweights.store import orgs
    from openweights.store import schema as s
    from openweights.store.db import Database
    from openweights.types import JobCreateParams

    db = Database(Settings(home=home).resolved_database_url())
    db.migrate()
    with db.write() as conn:
        now = db.now(conn)
        org = orgs.create_org(conn, "bench", now)["id"]
        _row, key = orgs.create_token(conn, org_id=org, name="admin", kind="user", now=now)
        workers = [f"worker-bench{i:07d}" for i in range(20)]
        conn.execute(
            insert(s.workers),
            [
                {
                    "id": w,
                    "org_id": org,
                    "name": f"pod-{i}",
                    "status": "active" if i < 4 else "shutdown",
                    "hardware": {
                        "gpu_count": 1,
                        "gpu_type": "A100",
                        "cpu_count": 16,
                        "memory_gb": 117.0,
                    },
                    "hardware_type": PRICED,
                    "vram_gb": 80.0,
                    "any_hardware": False,
                    "cached_models": [],
                    "provider": "runpod",
                    "last_seen_at": now,
                    "created_at": now - 86400,
                }
                for i, w in enumerate(workers)
            ],
        )
        ids, pks = [], []
        for i in range(n_jobs):
            row, _ = q.create_job(
                conn,
                org,
                JobCreateParams(
                    type=("fine-tuning", "inference", "custom")[i % 3],
                    script="python train.py",
                    params={"validated_params": {"learning_rate": 1e-4 * (1 + i % 7), "seed": i}},
                    model=f"org/model-{i % 13}",
                    requires_vram_gb=(24, 48, 80)[i % 3],
                ),
                now - 3 * n_jobs + 3 * i,
                3,
                lock=False,
            )
            ids.append(row["id"])
            pks.append(row["pk"])
        # 9 in 10 jobs (all but the newest 1,000) ran once, on a priced pod, for 10 minutes
        ran = list(range(max(0, n_jobs - 1000)))
        runs = [
            {
                "org_id": org,
                "job_pk": pks[i],
                "worker_id": workers[i % len(workers)],
                "attempt": 1,
                "status": "completed",
                "started_at": now - 3 * n_jobs + 3 * i + 1,
                "finished_at": now - 3 * n_jobs + 3 * i + 601,
                "exit_code": 0,
                "log_size": 0,
                "hardware": PRICED,
            }
            for i in ran
        ]
        for k in range(0, len(runs), 5000):
            conn.execute(insert(s.runs), runs[k : k + 5000])
        if ran:
            conn.execute(
                update(s.jobs)
                .where(s.jobs.c.org_id == org, s.jobs.c.pk <= pks[ran[-1]])
                .values(status="completed", attempts=1, started_at=s.jobs.c.created_at + 1,
                        finished_at=s.jobs.c.created_at + 601)
            )  # fmt: skip
        big = q.get_job(conn, org, ids[-1])
        run_id = conn.execute(
            insert(s.runs)
            .values(
                org_id=org,
                job_pk=big["pk"],
                worker_id=workers[0],
                attempt=1,
                status="completed",
                started_at=now - 3600,
                finished_at=now,
                log_size=0,
                hardware=PRICED,
            )
            .returning(s.runs.c.id)
        ).scalar_one()
        conn.execute(
            update(s.jobs)
            .where(s.jobs.c.pk == big["pk"])
            .values(status="completed", attempts=1, started_at=now - 3600, finished_at=now)
        )
        batch = []
        for k in range(n_events):
            step = k // 4 + 1
            kind = k % 4
            if kind == 0:
                data = {
                    "type": "progress",
                    "step": step,
                    "loss": 2.0 / step**0.5,
                    "learning_rate": 1e-4,
                    "grad_norm": 1.0,
                }
            elif kind == 3:  # the logprob callback's per-row event: not a line
                data = {"type": "logp", "step": step, "dataset": "d", "tag": "t", "row": 0,
                        "logp": -1.0}  # fmt: skip
            else:
                data = {"type": "logp_mean", "step": step, "dataset": "d",
                        "tag": ("a", "b")[kind - 1], "logp_mean": -1.0 / step}  # fmt: skip
            batch.append(
                {
                    "org_id": org,
                    "run_id": run_id,
                    "job_pk": big["pk"],
                    "data": data,
                    "created_at": now,
                }
            )
            if len(batch) == 5000:
                conn.execute(insert(s.events), batch)
                batch = []
        if batch:
            conn.execute(insert(s.events), batch)
    db.dispose()
    return {
        "key": key,
        "big": ids[-1],
        "mid": ids[n_jobs // 2],
        "other": ids[-2],
        "run_id": run_id,
        "worker": workers[0],
        "org": org,
        "db_url": Settings(home=home).resolved_database_url(),
    }


def add_samples(srv: ServerProcess, ids: dict, n_steps: int = 20) -> None:
    """A real samples file (uploaded over the API) and sampling events naming it."""
    from sqlalchemy import insert

    from openweights.store import schema as s
    from openweights.store.db import Database

    rows = [
        {"messages": [{"role": "user", "content": f"prompt {i}"}], "completion": f"answer {i}"}
        for i in range(50)
    ]
    body = "\n".join(json.dumps(r) for r in rows).encode()
    r = httpx.post(
        f"{srv.url}/v1/files",
        headers={"authorization": f"Bearer {ids['key']}"},
        files={"file": ("samples.jsonl", body)},
        data={"purpose": "result"},
        trust_env=False,
    )
    r.raise_for_status()
    fid = r.json()["id"]
    db = Database(ids["db_url"])
    with db.write() as conn:
        pk = conn.execute(
            s.jobs.select().with_only_columns(s.jobs.c.pk).where(s.jobs.c.id == ids["big"])
        ).scalar_one()
        conn.execute(
            insert(s.events),
            [
                {
                    "org_id": ids["org"],
                    "run_id": ids["run_id"],
                    "job_pk": pk,
                    "data": {"type": "samples", "tag": "s", "step": 100 * k, "file": fid},
                    "created_at": time.time(),
                }  # fmt: skip
                for k in range(n_steps)
            ],
        )
    db.dispose()


def timed(c: httpx.Client, path: str, repeat: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(repeat):
        t = perf_counter()
        r = c.get(path)
        times.append(perf_counter() - t)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        size = len(r.content)
    return times, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--floor-repeat", type=int, default=200)
    ap.add_argument("--browser", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        t0 = perf_counter()
        ids = seed(home, args.jobs, args.events)
        seeded_s = perf_counter() - t0
        srv = ServerProcess(home=home, env=clean_env(home)).start()
        add_samples(srv, ids)
        results: dict = {}
        big, mid, other = ids["big"], ids["mid"], ids["other"]
        try:
            with httpx.Client(base_url=srv.url, trust_env=False, timeout=120) as c:
                floors = {}
                for name, path in (
                    ("GET /health", "/health"),
                    ("GET /dashboard/login", "/dashboard/login"),
                ):
                    timed(c, path, 20)  # warm-up
                    times, size = timed(c, path, args.floor_repeat)
                    floors[name] = {**summary_ms(times), "bytes": size}
                    print(f"floor {name:49s} p50 {floors[name]['p50_ms']:9.2f} ms")
                floor = floors["GET /health"]["p50_ms"]
                r = c.post("/dashboard/login", data={"api_key": ids["key"]})
                assert r.status_code == 303, r.text
                # first load of a 100k-event run's metrics: reads every event once
                t = perf_counter()
                r = c.get(f"/dashboard/jobs/{big}/metrics.json")
                first_metrics_ms = (perf_counter() - t) * 1000
                assert r.status_code == 200
                print(
                    f"{'metrics.json, first load (reads 100k events)':55s}      {first_metrics_ms:9.1f} ms"
                )
                pages = {
                    "jobs list": "/dashboard/jobs",
                    "jobs list, status+type filter": "/dashboard/jobs?status=pending&type=custom",
                    "jobs list, text search": "/dashboard/jobs?q=seed%22%3A4242",
                    "jobs list, page 100": f"/dashboard/jobs?after={mid}",
                    "job detail": f"/dashboard/jobs/{big}",
                    "events page (first 200)": f"/dashboard/jobs/{big}/events",
                    "events page, type filter": f"/dashboard/jobs/{big}/events?type=logp_mean",
                    "plots page (HTML)": f"/dashboard/jobs/{big}/plots",
                    "metrics.json (100k events → ≤2000 points/series)": f"/dashboard/jobs/{big}/metrics.json",
                    "samples page (20 steps, 50 rows)": f"/dashboard/jobs/{big}/samples",
                    "token log-probs page": f"/dashboard/jobs/{big}/heatmap",
                    "logs page": f"/dashboard/jobs/{big}/logs",
                    "compare 2 jobs (HTML)": f"/dashboard/compare?jobs={big}&jobs={other}",
                    "files": "/dashboard/files",
                    "models": "/dashboard/models",
                    "deployments": "/dashboard/deployments",
                    "workers (20)": "/dashboard/workers",
                    "worker page": f"/dashboard/workers/{ids['worker']}",
                    "cost (9,001 runs)": "/dashboard/cost",
                    "settings": "/dashboard/settings",
                }
                for name, path in pages.items():
                    times, size = timed(c, path, args.repeat)
                    results[name] = {**summary_ms(times), "bytes": size}
                    results[name]["first_ms"] = round(times[0] * 1000, 1)
                    results[name]["ratio_to_health"] = ratio(results[name]["p50_ms"], floor)
                    print(
                        f"{name:55s} p50 {results[name]['p50_ms']:9.1f} ms  "
                        f"×{results[name]['ratio_to_health']:>7.1f}  first "
                        f"{results[name]['first_ms']:8.1f} ms  {size:>9} B"
                    )
                cookie = c.cookies.get("ow_session")
            if args.browser:
                from playwright.sync_api import sync_playwright

                sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
                from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS

                with sync_playwright() as p:
                    b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                    ctx = b.new_context()
                    ctx.add_cookies(
                        [{"name": "ow_session", "value": cookie, "url": srv.url + "/dashboard/"}]
                    )
                    page = ctx.new_page()
                    for name, path, ready in (
                        ("plots page in chromium until drawn", f"/dashboard/jobs/{big}/plots",
                         '#plots[data-ready="1"]'),
                        ("jobs list in chromium until loaded", "/dashboard/jobs", "#jobs"),
                    ):  # fmt: skip
                        times = []
                        for _ in range(args.repeat):
                            t = perf_counter()
                            page.goto(srv.url + path)
                            page.wait_for_selector(ready, state="attached", timeout=120_000)
                            times.append(perf_counter() - t)
                        results[name] = summary_ms(times)
                        results[name]["ratio_to_health"] = ratio(results[name]["p50_ms"], floor)
                        print(f"{name:55s} p50 {results[name]['p50_ms']:9.1f} ms")
                    b.close()
        finally:
            srv.stop()
    out = {
        "bench": "dashboard",
        "backend": "sqlite",
        "jobs": args.jobs,
        "events_in_one_run": args.events,
        "seed_s": round(seeded_s, 1),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "floors": floors,
        "metrics_first_load_ms": round(first_metrics_ms, 1),
        "pages": results,
    }
    print(f"load average before {out['loadavg_before']}, after {out['loadavg_after']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
