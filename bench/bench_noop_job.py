"""A no-op custom job, create → the client sees `completed`, vs a bare `python -c pass` start.

Real server process + one real worker process (`python -m openweights.worker`), the public SDK;
the job's command is `true` (no Python start) and, as a second series, `python -c pass`.

    python bench/bench_noop_job.py [--backend sqlite|postgres] [--n 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import backend, base_env, machine, summary_ms  # noqa: E402


def python_pass_s(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    ap.add_argument("--n", type=int, default=30)
    args = ap.parse_args()
    from openweights import OpenWeights

    results: dict = {"machine": machine(), "backend": args.backend}
    with backend(args.backend) as b:
        srv = b.start_server("noop")
        key = srv.signup()
        ow = OpenWeights(base_url=srv.url, api_key=key)
        wtoken = ow.tokens.create(name="bench worker", kind="worker").token
        wlog = open(srv.home / "worker.log", "ab")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openweights.worker",
                "--url",
                srv.url,
                "--token",
                wtoken,
                "--name",
                "bench",
            ],
            env=base_env(srv.home / "worker-home"),
            stdout=wlog,
            stderr=subprocess.STDOUT,
        )
        try:
            for label, script in (
                ("true", "true"),
                ("python -c pass", f"{sys.executable} -c pass"),
            ):
                times = []
                for i in range(args.n + 3):
                    t0 = time.perf_counter()
                    job = ow.jobs.create(
                        type="custom",
                        id_prefix="noop",
                        params={"i": i, "label": label},
                        script=script,
                    )
                    job.wait(timeout=60)
                    dt = time.perf_counter() - t0
                    assert job.status == "completed", job
                    if i >= 3:  # warm-up: worker registration, first imports
                        times.append(dt)
                results[label] = summary_ms(times)
            results["python -c pass"]["floor"] = summary_ms(python_pass_s(args.n))
        finally:
            worker.terminate()
            worker.wait(30)
            srv.stop()
    floor_p50 = results["python -c pass"]["floor"]["p50_ms"]
    print(
        f"| job command | create → completed p50 ms | p99 ms | − `python -c pass` p50 ({floor_p50:.0f} ms) |"
    )
    print("|---|---:|---:|---:|")
    for label in ("true", "python -c pass"):
        r = results[label]
        print(
            f"| `{label}` | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['p50_ms'] - floor_p50:+.0f} ms |"
        )
    out = Path(__file__).parent / "results" / f"noop_{args.backend}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
