"""`ow.inspect_ai`: run an Inspect-AI eval against a model served inside the job.

```python
job = ow.inspect_ai.create(model="unsloth/Qwen3-4B", eval_name="inspect_evals/gpqa_diamond",
                           options="--top-p 0.9 --limit 50")
job.wait(); job.download("output")      # the .eval logs land in output/
```

The job serves the model locally (`openweights.jobs.serving`: vLLM on CUDA, `transformers serve`
on CPU) and runs `inspect eval <eval_name> --model openai-api/ow/<model>` against it, with
`OW_BASE_URL`/`OW_API_KEY` set, so it needs no OpenAI account and no network beyond what the eval's
dataset needs. `eval_name` is a registry name (`inspect_evals/...`, needs `pip install
inspect-evals` on the worker) or a local task file or directory (`my_task.py`,
`my_task.py@task_name`), which is uploaded with the job. `options` are passed on to
`inspect eval` unchanged. The summary of each eval (status, metrics) is logged as an event, so
`job.outputs["results"]` has the scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from openweights.client.custom_job import MOUNT_PURPOSE, Jobs, expand_mounts, register
from openweights.client.files import file_id_of_path
from openweights.jobs.api import estimate_vram_gb

__all__ = ["InspectAi", "InspectAiConfig"]

#: Where a mounted task file or directory goes in the job's working directory.
TASKS_DIR = "tasks"


class InspectAiConfig(BaseModel):
    """`ow.inspect_ai.create(...)` parameters (names and defaults as the original's)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hub id, local path, registered model or LoRA adapter.")
    eval_name: str = Field(
        description="Registry task (`inspect_evals/gpqa_diamond`) or a local task file/dir."
    )
    max_model_len: int = Field(default=8192, ge=16)
    options: str = Field(default=" ", description="Passed on to `inspect eval` as they are.")
    engine: str = Field(default="auto", description='"auto", "vllm" or "transformers".')
    job_id_suffix: str | None = None


def model_alias(ref: str) -> str:
    """The name inspect sees: the reference, or a directory's name for a local path."""
    if ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().is_dir():
        return Path(ref).expanduser().resolve().name
    return ref


@register("inspect_ai")
class InspectAi(Jobs):
    type = "inspect_ai"
    params = InspectAiConfig
    requires_vram_gb = 60

    def get_entrypoint(self, validated_params: BaseModel) -> str:
        return "python -m openweights.jobs.inspect_ai.entry"

    def prepare(self, **kwargs: Any):  # type: ignore[override]
        """As `Jobs.prepare`, plus: a local task file or directory is mounted under `tasks/`."""
        eval_name = kwargs.get("eval_name")
        mount: dict[str, str] = {}
        if isinstance(eval_name, str):
            path, at, task_name = eval_name.partition("@")
            local = Path(path).expanduser()
            if path and local.exists():
                remote = f"{TASKS_DIR}/{local.name}"
                mount = {str(local): remote + ("/" if local.is_dir() else "")}
                kwargs["eval_name"] = f"{remote}{at}{task_name}"
        if kwargs.get("requires_vram_gb") in (None, "guess") and not kwargs.get("allowed_hardware"):
            kwargs["requires_vram_gb"] = estimate_vram_gb(str(kwargs.get("model", "")))
        prepared = super().prepare(**kwargs)
        mounted = prepared.request.params["mounted_files"]
        for remote, local_file in expand_mounts(mount).items():
            fid = file_id_of_path(MOUNT_PURPOSE, local_file)
            mounted[remote] = fid
            prepared.uploads.setdefault(fid, local_file)
        return prepared
