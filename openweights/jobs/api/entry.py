"""Worker side of an `api` job: serve the models until canceled or idle.

Logs `{"type": "deployment", "base_url", "api_key", "models", ...}` once every model answers;
the openweights server routes `/v1/chat/completions` and `/v1/completions` to it. Exits 0 after
`idle_timeout_s` without requests (event `{"type": "deployment_stopped", "reason": "idle"}`),
and stops the model server on SIGTERM (cancel).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from openweights.client import OpenWeights
from openweights.jobs.api import ApiConfig
from openweights.jobs.serving import ModelServerError, ServingOptions, serve

#: How often the job checks its model server and its idle clock.
CHECK_INTERVAL_S = 0.5


def main() -> int:
    ow = OpenWeights()
    job = ow.jobs.retrieve(os.environ["OPENWEIGHTS_JOB_ID"])
    cfg = ApiConfig(**job.params["validated_params"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    options = ServingOptions(
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_lora_rank=cfg.max_lora_rank,
        max_loras=cfg.max_loras,
        quantization=cfg.quantization,
        kv_cache_dtype=cfg.kv_cache_dtype,
        engine=cfg.engine,
    )
    try:
        with serve(cfg.models, ow=ow, options=options) as s:
            ow.run.log(
                {
                    "type": "deployment",
                    "base_url": s.base_url,
                    "api_key": s.api_key,
                    "models": s.model_names,
                    "engine": s.engine,
                    "idle_timeout_s": cfg.idle_timeout_s,
                    "server_pid": s.process.pid,
                }
            )
            print(f"[openweights] serving {', '.join(s.model_names)} at {s.base_url}", flush=True)
            worker = os.getppid()
            while not stop.wait(CHECK_INTERVAL_S):
                if os.getppid() != worker:  # the worker died (SIGKILL): nobody routes here now
                    print("[openweights] the worker is gone: stopping", file=sys.stderr, flush=True)
                    return 1
                if s.process.poll() is not None:
                    print(
                        f"[openweights] the model server exited with code {s.process.returncode}",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
                if s.front.idle_s() > cfg.idle_timeout_s:
                    ow.run.log(
                        {"type": "deployment_stopped", "reason": "idle", "idle_s": s.front.idle_s()}
                    )
                    print(f"[openweights] idle for {cfg.idle_timeout_s:g} s: stopping", flush=True)
                    return 0
            print("[openweights] stopping (canceled)", flush=True)
            return 0
    except ModelServerError as e:
        print(f"[openweights] deployment failed: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
