"""Worker side of an `inspect_ai` job: serve the model in the job, run `inspect eval` against it.

The eval logs go to `uploads/` (the worker uploads them: `job.download("output")`); one event per
log carries its task, status and metrics.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from openweights.client import OpenWeights
from openweights.jobs.inspect_ai import InspectAiConfig, model_alias
from openweights.jobs.serving import ModelServerError, ServingOptions, serve

LOG_DIR = "uploads"


def _inspect_cmd() -> list[str]:
    exe = shutil.which("inspect", path=os.path.dirname(sys.executable))
    if exe is None:
        try:
            import inspect_ai  # noqa: F401
        except ImportError:
            raise SystemExit(
                'inspect-ai is not installed on this worker: pip install "openweights[inspect]"'
            ) from None
        return [sys.executable, "-m", "inspect_ai"]
    return [exe]


def check_task(eval_name: str) -> None:
    """Fail before loading the model when the task can be neither a file nor a registry name."""
    import importlib.util

    path = eval_name.partition("@")[0]
    if Path(path).exists():
        return
    package = path.split("/")[0]
    if not package.isidentifier() or importlib.util.find_spec(package) is None:
        raise SystemExit(
            f"eval_name {eval_name!r}: no such task file in the job, and no package {package!r} "
            "on this worker (registry tasks need their package, e.g. pip install inspect-evals; "
            "a local task file given as eval_name is uploaded with the job)"
        )


def _summaries(log_dir: Path) -> list[dict[str, Any]]:
    """Task, status and metrics of each eval log written."""
    from inspect_ai.log import list_eval_logs, read_eval_log

    out = []
    for info in list_eval_logs(str(log_dir)):
        log = read_eval_log(info, header_only=True)
        metrics: dict[str, float] = {}
        for score in (log.results.scores if log.results else []) or []:
            for name, m in score.metrics.items():
                metrics[f"{score.name}/{name}"] = m.value
        out.append(
            {
                "task": log.eval.task,
                "status": log.status,
                "model": log.eval.model,
                "metrics": metrics,
                "log": Path(info.name).name,
                "samples": log.results.total_samples if log.results else 0,
            }
        )
    return out


def main() -> int:
    ow = OpenWeights()
    job = ow.jobs.retrieve(os.environ["OPENWEIGHTS_JOB_ID"])
    cfg = InspectAiConfig(**job.params["validated_params"])
    cmd = _inspect_cmd()  # fail before loading the model when inspect is missing
    check_task(cfg.eval_name)
    alias = model_alias(cfg.model)
    options = ServingOptions(max_model_len=cfg.max_model_len, engine=cfg.engine)
    log_dir = Path(LOG_DIR)
    log_dir.mkdir(exist_ok=True)
    try:
        with serve(
            [cfg.model], ow=ow, options=options, public=False, aliases={alias: cfg.model}
        ) as s:
            env = {**os.environ, "OW_BASE_URL": s.base_url, "OW_API_KEY": s.api_key}
            argv = [
                *cmd, "eval", cfg.eval_name, "--model", f"openai-api/ow/{alias}",
                "--log-dir", str(log_dir), "--display", "plain",
                *shlex.split(cfg.options),
            ]  # fmt: skip
            print(f"[openweights] {shlex.join(argv)}", flush=True)
            rc = subprocess.call(argv, env=env)
    except ModelServerError as e:
        print(f"[openweights] could not serve {cfg.model}: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        results = _summaries(log_dir)
    except Exception as e:  # the logs are uploaded either way
        print(f"[openweights] could not read the eval logs: {e}", file=sys.stderr, flush=True)
        results = []
    ow.run.log({"type": "inspect_results", "results": results})
    if rc != 0:
        print(f"[openweights] inspect eval exited with code {rc}", file=sys.stderr, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
