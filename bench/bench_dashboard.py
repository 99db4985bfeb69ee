"""Dashboard page load with 10,000 jobs and 100,000 events in one run, on a real server process.

    python bench/bench_dashboard.py                                  # SQLite, 10k jobs, 100k events
    python bench/bench_dashboard.py --jobs 10000 --events 100000 --out bench/results/dashboard.json
    python bench/bench_dashboard.py --browser     # also: time until the plots page has drawn

The org's jobs and one run's events are written straight into a fresh database (store functions
and table inserts, before the server starts); then each page is fetched `--repeat` times over
HTTP with a session cookie (server time: request to last byte). `--browser` also loads the plots
page in chromium and times until every chart is drawn (`#plots[data-ready]`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from time import perf_counter

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ServerProcess, clean_env, summary_ms  # noqa: E402


def seed(home: Path, n_jobs: int, n_events: int) -> tuple[str, str, str]:
    """(api key, the big job's id, a job id deep in the list)."""
    from sqlalchemy import insert

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
        ids = []
        for i in range(n_jobs):
            row, _ = q.create_job(
                conn,
                org,
                JobCreateParams(
                    type=("fine-tuning", "inference", "custom")[i % 3],
                    script="python train.py",
                    params={"validated_params": {"learning_rate": 1e-4 * (1 + i % 7), "seed": i}},
                    model=f"org/model-{i % 13}",
                ),
                now - n_jobs + i,
                3,
                lock=False,
            )
            ids.append(row["id"])
        big = q.get_job(conn, org, ids[-1])
        run_id = conn.execute(
            insert(s.runs)
            .values(
                org_id=org,
                job_pk=big["pk"],
                attempt=1,
                status="completed",
                started_at=now,
                log_size=0,
            )
            .returning(s.runs.c.id)
        ).scalar_one()
        batch = []
        for k in range(n_events):
            step = k // 2 + 1
            data = (
                {"type": "progress", "step": step, "loss": 2.0 / step**0.5, "learning_rate": 1e-4}
                if k % 2 == 0
                else {
                    "type": "logp_mean",
                    "step": step,
                    "dataset": "d",
                    "tag": "t",
                    "logp_mean": -1.0,
                }
            )
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
    return key, ids[-1], ids[n_jobs // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--browser", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        t0 = perf_counter()
        key, big, mid = seed(home, args.jobs, args.events)
        seeded_s = perf_counter() - t0
        srv = ServerProcess(home=home, env=clean_env(home)).start()
        results: dict = {}
        try:
            with httpx.Client(base_url=srv.url, trust_env=False, timeout=120) as c:
                r = c.post("/dashboard/login", data={"api_key": key})
                assert r.status_code == 303, r.text
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
                }
                for name, path in pages.items():
                    times = []
                    for _ in range(args.repeat):
                        t = perf_counter()
                        r = c.get(path)
                        times.append(perf_counter() - t)
                        assert r.status_code == 200, (path, r.status_code, r.text[:300])
                    results[name] = {**summary_ms(times), "bytes": len(r.content)}
                    print(
                        f"{name:55s} p50 {results[name]['p50_ms']:9.1f} ms  {len(r.content):>9} B"
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
                    times = []
                    for _ in range(args.repeat):
                        t = perf_counter()
                        page.goto(f"{srv.url}/dashboard/jobs/{big}/plots")
                        page.wait_for_selector(
                            '#plots[data-ready="1"]', state="attached", timeout=120_000
                        )
                        times.append(perf_counter() - t)
                    results["plots page in chromium until drawn"] = summary_ms(times)
                    print(
                        f"{'plots page in chromium until drawn':55s} p50 {results['plots page in chromium until drawn']['p50_ms']:9.1f} ms"
                    )
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
        "pages": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
