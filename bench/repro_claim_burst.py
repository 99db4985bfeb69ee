"""Reproducer: idle long-polling workers and a burst of as many jobs. How long does each worker wait
for its job? On PostgreSQL a claim locks up to 64 candidate rows (`FOR UPDATE SKIP LOCKED`), so a
concurrent claim can find nothing although jobs are pending and go back to waiting until the next
wake-up (or the 10-s wait slice). See docs/benchmarks.md, "Problems found in the server".

    python bench/repro_claim_burst.py --backend postgres --rounds 6
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import backend  # noqa: E402
from bench_queue import COMPLETE, JOB, WORKER, client  # noqa: E402


def one_round(url: str, token: str, n: int) -> list[float]:
    """`n` workers park in a 30-s long-poll; `n` jobs are created at once. Seconds from the burst
    to each worker's claim answer, sorted."""
    with client(url, token) as c:
        wids = [c.post("/v1/workers", json=WORKER).json()["id"] for _ in range(n)]
    got: list[float] = []
    runs: list[int] = []

    def work(k: int) -> None:
        with client(url, token) as c:
            r = c.post(f"/v1/workers/{wids[k]}/claim", json={"wait_s": 30})
            got.append(perf_counter())
            if r.status_code == 200:
                runs.append(r.json()["run"]["id"])

    def create() -> None:
        with client(url, token) as c:
            c.post("/v1/jobs", json={**JOB, "job_id_suffix": f"burst-{uuid.uuid4().hex[:8]}"})

    ws = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in ws:
        t.start()
    time.sleep(0.5)  # all parked in the long-poll
    t0 = perf_counter()
    cs = [threading.Thread(target=create) for _ in range(n)]
    for t in cs:
        t.start()
    for t in cs + ws:
        t.join()
    # Jobs run for minutes in real life: complete them only now (a completion wakes parked
    # claims, which would hide the problem), and before their leases lapse into the next round.
    with client(url, token) as c:
        for run_id in runs:
            c.post(f"/v1/runs/{run_id}/complete", json=COMPLETE)
    return sorted(round(g - t0, 3) for g in got)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    worst: list[float] = []
    with backend(args.backend) as be:
        srv = be.start_server()
        try:
            token = srv.signup()
            for rnd in range(args.rounds):
                waits = one_round(srv.url, token, args.workers)
                worst.append(waits[-1])
                print(f"round {rnd}: each worker got its job after (s): {waits}", flush=True)
        finally:
            srv.stop()
    slow = sum(1 for w in worst if w > 5)
    print(
        f"{args.backend}: {slow} of {len(worst)} rounds had a worker wait > 5 s for a pending job"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
