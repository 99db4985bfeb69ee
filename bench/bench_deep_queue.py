"""What a deep queue costs: create, read and claim with 0 to 100k pending jobs of the org.

A real server process on one backend; one registered worker holds a run (busy: every new job's
pending reason counts the jobs ahead), a second one claims and completes. At each depth the
pending jobs are added straight into the database (copies of one job row, one statement), then
`POST /v1/jobs`, `GET /v1/jobs/{id}` of the newest pending job, claim+complete cycles, a page of
`GET /v1/jobs` (all, and pending only) and a `POST /v1/jobs/find` that matches nothing are
timed, each beside `GET /health` on the same connection in the same loop (the floor). Target:
flat — no route's cost grows with the queue.

    python bench/bench_deep_queue.py [--backend sqlite|postgres] [--depths 0 20000 100000] [--n 200]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import backend, machine, summary_ms  # noqa: E402

JOB = {"type": "custom", "script": "true", "params": {}}


def fill(srv, backend_name: str, depth: int) -> int:
    """Adds copies of the org's oldest pending job until `depth` are pending; returns how many."""
    sql_count = "SELECT count(*) FROM jobs WHERE status = 'pending'"
    if backend_name == "postgres":
        import psycopg

        conn = psycopg.connect(srv.env["OPENWEIGHTS_DATABASE_URL"], autocommit=True)
        cols = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'jobs' AND column_name <> 'pk'"
            )
        ]
        series = "generate_series(1, {n}) AS g"
    else:
        conn = sqlite3.connect(srv.home / "openweights.db", isolation_level=None, timeout=30)
        cols = [r[1] for r in conn.execute("PRAGMA table_info(jobs)") if r[1] != "pk"]
        series = (
            "(WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {n}) "
            "SELECT g FROM s)"
        )
    have = conn.execute(sql_count).fetchone()[0]
    n = depth - have
    if n > 0:
        exprs = []
        for c in cols:
            if c == "id":
                exprs.append(f"j.id || '-deep{depth}-' || g")
            elif c in ("queued_at", "created_at", "updated_at"):  # older than what comes next
                exprs.append(f"j.{c} - 1000 + g * 0.000001")
            else:
                exprs.append(f"j.{c}")
        conn.execute(
            f"INSERT INTO jobs ({', '.join(cols)}) SELECT {', '.join(exprs)} "
            f"FROM jobs AS j, {series.format(n=n)} "
            "WHERE j.pk = (SELECT min(pk) FROM jobs WHERE status = 'pending')"
        )
    got = conn.execute(sql_count).fetchone()[0]
    conn.close()
    return got


def timed(fn, http, n: int) -> tuple[dict, dict]:
    """`fn()` n times, each after one `GET /health` on the same client: (route, floor) in ms."""
    route, floor = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        http.get("/health")
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        floor.append(t1 - t0)
        route.append(t2 - t1)
    return summary_ms(route), summary_ms(floor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 20_000, 100_000])
    ap.add_argument("--n", type=int, default=200, help="timed requests per route and depth")
    args = ap.parse_args()
    import httpx

    results: dict = {"machine": machine(), "backend": args.backend, "depths": []}
    with backend(args.backend) as b:
        srv = b.start_server("deep")
        key = srv.signup()
        http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"})

        def post(path: str, body: dict) -> httpx.Response:
            r = http.post(path, json=body)
            assert r.status_code in (200, 204), (path, r.status_code, r.text)
            return r

        busy = post("/v1/workers", {"name": "busy"}).json()["id"]
        claimer = post("/v1/workers", {"name": "claimer"}).json()["id"]
        post("/v1/jobs", {**JOB, "job_id_suffix": "held"})
        assert post(f"/v1/workers/{busy}/claim", {"wait_s": 0}).status_code == 200
        post("/v1/jobs", {**JOB, "job_id_suffix": "template"})  # the row `fill` copies
        seq = iter(range(10**9))
        last: dict = {}  # the newest job created
        for depth in args.depths:
            pending = fill(srv, args.backend, max(depth, 1))

            def create() -> None:
                last["id"] = post("/v1/jobs", {**JOB, "job_id_suffix": f"c{next(seq)}"}).json()[
                    "id"
                ]

            def read() -> None:
                assert http.get(f"/v1/jobs/{last['id']}").status_code == 200

            def cycle() -> None:
                got = post(f"/v1/workers/{claimer}/claim", {"wait_s": 0}).json()
                post(f"/v1/runs/{got['run']['id']}/complete", {"status": "completed"})

            def listed(status: str | None = None) -> None:
                q = "?limit=100" + (f"&status={status}" if status else "")
                assert http.get("/v1/jobs" + q).status_code == 200

            def find() -> None:  # a miss: the worst case, every job of the org looked at
                body = {"params": {"no such": "param"}, "status": "pending"}
                assert post("/v1/jobs/find", body).json()["data"] == []

            row = {"pending": pending}
            routes = (
                ("create", create, args.n),
                ("read", read, args.n),
                ("claim+complete", cycle, args.n),
                ("list", listed, args.n // 4),
                ("list pending", lambda: listed("pending"), args.n // 4),
                ("find (miss)", find, max(3, args.n // 40)),
            )
            for name, fn, n in routes:
                fn()  # warm-up
                route, floor = timed(fn, http, n)
                row[name] = {"route": route, "health": floor,
                             "ratio_p50": route["p50_ms"] / floor["p50_ms"]}  # fmt: skip
            last_reason = http.get(f"/v1/jobs/{last['id']}").json().get("pending_reason")
            row["reason"] = last_reason
            results["depths"].append(row)
            print(f"{pending:>7} pending: " + "; ".join(
                f"{k} p50 {row[k]['route']['p50_ms']:.2f} ms ({row[k]['ratio_p50']:.2f}x /health)"
                for k, _, _ in routes
            ) + f" | {last_reason}")  # fmt: skip
        srv.stop()
    out = Path(__file__).parent / "results" / f"deep_queue_{args.backend}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
