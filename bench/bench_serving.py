"""Deployments: time from `up()` to the first answer, and what each hop adds to a completion.

Real server process + one real worker process; the deployment is an `api` job running
`transformers serve` on the tiny model (CPU). Three series of one-token chat completions,
interleaved request by request so that machine load hits them alike:

* `upstream`: straight to `transformers serve` (an in-process `serve()` here, same code as the job)
* `front_local`: that `serve()`'s authenticating front, which forwards to `upstream`
* `front`:    the deployment job's front (same code, in the job on the worker)
* `server`:   the openweights server's `/v1/chat/completions`, which forwards to the job's front

`server − front` is what the server's routing adds (target ≤ 5 ms p50); `front_local − upstream`
what the front adds. `health` (`GET /health` on the server) is the floor of one extra hop to the
server process under the same load.

    python bench/bench_serving.py [--n 200] [--out bench/results/serving.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import backend, base_env, cpu_seconds, machine, summary_ms  # noqa: E402

MSG = [{"role": "user", "content": "apple river"}]


def _post(http, url: str, key: str, model: str) -> float:
    body = {"model": model, "messages": MSG, "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    if model is None:  # the floor: one round trip to the server process, no work
        r = http.get(url)
    else:
        r = http.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
    dt = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    return dt


def interleaved(targets: dict[str, tuple[str, str, str]], n: int, warmup: int = 10) -> dict:
    """`{name: (url, key, model)}` → per-target latencies, one request of each per round."""
    import httpx

    clients = {k: httpx.Client(timeout=60, trust_env=False) for k in targets}
    out: dict[str, list[float]] = {k: [] for k in targets}
    try:
        for i in range(warmup + n):
            for name, (url, key, model) in targets.items():
                dt = _post(clients[name], url, key, model)
                if i >= warmup:
                    out[name].append(dt)
    finally:
        for c in clients.values():
            c.close()
    return out


def paired_delta_ms(a: list[float], b: list[float]) -> dict:
    d = sorted((x - y) * 1000 for x, y in zip(a, b, strict=True))
    return {"p50_ms": round(statistics.median(d), 3), "mean_ms": round(statistics.fmean(d), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving.json"))
    args = ap.parse_args()
    from openweights import OpenWeights
    from openweights.jobs.serving import serve
    from openweights.testing import make_tiny_model

    results: dict = {"machine": machine()}
    with backend("sqlite") as b:
        srv = b.start_server("serving")
        ow = OpenWeights(base_url=srv.url, api_key=srv.signup())
        tiny = str(make_tiny_model(srv.home / "tiny"))
        wtoken = ow.tokens.create(name="bench worker", kind="worker").token
        worker = subprocess.Popen(
            [sys.executable, "-m", "openweights.worker", "--url", srv.url, "--token", wtoken]
            + ["--any-hardware", "--name", "bench"],
            env=base_env(srv.home / "worker-home"),
            stdout=open(srv.home / "worker.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            t0 = time.perf_counter()
            api = ow.api.deploy(tiny)
            api.up()
            t_up = time.perf_counter() - t0
            ow.chat.completions.create(model=tiny, messages=MSG, max_tokens=1, deploy=False)
            t_first = time.perf_counter() - t0
            job = ow.jobs.retrieve(api.job_id)
            info = next(
                e
                for e in ow.events.list(job_id=api.job_id)
                if e["data"].get("type") == "deployment"
            )
            results["up"] = {
                "up_to_first_answer_s": round(t_first, 2),
                "up_returned_s": round(t_up, 2),
                "queued_to_started_s": round(job.started_at - job.created_at, 2),
                "started_to_serving_s": round(info["created_at"] - job.started_at, 2),
                "note": "started_to_serving = python start + model server start + model load + a warm-up answer",
            }
            print(json.dumps(results["up"], indent=1), flush=True)
            data = info["data"]
            with serve([tiny], workdir=srv.home, public=False) as local:
                lat = interleaved(
                    {
                        "upstream": (f"{local.upstream_url}/v1/chat/completions", "-", tiny),
                        "front_local": (f"{local.base_url}/chat/completions", local.api_key, tiny),
                        "front": (f"{data['base_url']}/chat/completions", data["api_key"], tiny),
                        "server": (f"{api.base_url}/chat/completions", api.api_key, tiny),
                        "health": (f"{srv.url}/health", "-", None),
                    },
                    args.n,
                )
            results["latency"] = {k: summary_ms(v) for k, v in lat.items()}
            results["added"] = {
                "server_routing_over_front": paired_delta_ms(lat["server"], lat["front"]),
                "front_over_upstream": paired_delta_ms(lat["front_local"], lat["upstream"]),
                "server_routing_over_front_minus_health_floor": paired_delta_ms(
                    [s - h for s, h in zip(lat["server"], lat["health"], strict=True)], lat["front"]
                ),
            }
            # CPU the server process spends per request: unlike latency, barely moved by load
            cpu = {}
            for name, target in (
                ("routed_chat_completion", (f"{api.base_url}/chat/completions", api.api_key, tiny)),
                ("health", (f"{srv.url}/health", "-", None)),
            ):
                before = cpu_seconds(srv.pid)
                interleaved({name: target}, args.n, warmup=0)
                cpu[name] = round((cpu_seconds(srv.pid) - before) / args.n * 1000, 3)
            results["server_cpu_ms_per_request"] = cpu
            results["load_average"] = os.getloadavg()
            api.down()
        finally:
            worker.terminate()  # it stops the deployment's job (and its model server) first
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
                worker.wait()
            srv.stop()
    keys = ("latency", "added", "server_cpu_ms_per_request", "load_average")
    print(json.dumps({k: results[k] for k in keys}, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
