"""The environment a job's process gets.

The original passed the pod's whole environment (RUNPOD_API_KEY, the org's OPENWEIGHTS_API_KEY…) to
every job. Here the worker's own credentials and server configuration never reach the job: it gets
the org's secrets, a run-scoped token and the ids it needs, nothing more privileged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping

from openweights.types import ClaimResponse

__all__ = ["WORKER_SECRET_NAMES", "build_job_env"]

#: Worker-side variables a job must not inherit. Every `OPENWEIGHTS_*` variable is dropped as well:
#: on an embedded deployment the worker may carry the server's DATABASE_URL or SECRET_KEY.
WORKER_SECRET_NAMES = frozenset(
    {
        "RUNPOD_API_KEY",
        "OW_WORKER_TOKEN",
        "WORKER_TOKEN",
        "SUPABASE_SERVICE_ROLE_KEY",
    }
)


def _is_worker_secret(name: str, value: str, tokens: set[str]) -> bool:
    return (
        name.startswith("OPENWEIGHTS_")
        or name in WORKER_SECRET_NAMES
        or (bool(value) and value in tokens)
    )


def build_job_env(
    base_env: Mapping[str, str],
    claim: ClaimResponse,
    *,
    url: str,
    n_gpus: int,
    worker_tokens: Iterable[str] = (),
) -> dict[str, str]:
    """Worker env minus its secrets, plus org secrets and the run's identity and token."""
    tokens = {t for t in worker_tokens if t}
    env = {k: v for k, v in base_env.items() if not _is_worker_secret(k, v, tokens)}
    env.update(claim.env)
    from openweights.worker.hardware import model_cache_dir

    env.update(
        {
            # registry models fetched by jobs are shared by this worker's jobs (and reported to
            # the server as cached, so the scheduler can prefer a warm worker)
            "OPENWEIGHTS_MODEL_CACHE": str(model_cache_dir(base_env)),
            "OPENWEIGHTS_URL": url,
            "OPENWEIGHTS_API_KEY": claim.token,
            "OPENWEIGHTS_RUN_ID": str(claim.run.id),
            "OPENWEIGHTS_JOB_ID": claim.job.id,
            "N_GPUS": str(n_gpus),
            "PYTHONUNBUFFERED": "1",
        }
    )
    # `python` in the script must be the interpreter that has openweights installed.
    bindir = os.path.dirname(sys.executable)
    path = env.get("PATH", "")
    env["PATH"] = bindir + (os.pathsep + path if path else "")
    return env
