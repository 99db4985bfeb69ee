"""`ow.fine_tuning`: LoRA (or full) SFT, DPO and ORPO with TRL + PEFT on transformers.

Client side only: validation and submission. `create` also reads the training and test files
(streamed; files over `CHECK_MAX_BYTES` are left to the job) and refuses rows that cannot be
trained on, naming file, line and field. The training runs on a worker as
`python -m openweights.jobs.fine_tuning.entry`, which reads its params from its own job.
See `entry.py` for what a job writes (model, checkpoints, events).
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Any

from pydantic import BaseModel

from openweights.client.custom_job import Jobs, register
from openweights.client.files import is_file_id
from openweights.jobs.fine_tuning.params import SamplingCallback, TrainingConfig
from openweights.validation import iter_lines, validate_training_lines

__all__ = ["CHECK_MAX_BYTES", "FineTuning", "SamplingCallback", "TrainingConfig"]

#: Larger training files are checked by the job when it starts, not downloaded at `create`.
CHECK_MAX_BYTES = 256 << 20


def fill_name(template: str, params: dict[str, Any]) -> str:
    """Fill `{model_name}`, `{org_id}` (HF_ORG / HF_USER when set) and `{<string param>}`;
    `{job_id}` (and `{org_id}` when no HF org is set) are left for the server."""
    values = {k: v for k, v in params.items() if isinstance(v, str) and k != "finetuned_model_id"}
    values.update(
        {k: str(v) for k, v in (params.get("model_naming_extra_parameters") or {}).items()}
    )
    values["model_name"] = params["model"].rstrip("/").split("/")[-1]
    hf_org = os.environ.get("HF_ORG") or os.environ.get("HF_USER")
    if hf_org:
        values["org_id"] = hf_org
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


@register("fine_tuning")
class FineTuning(Jobs):
    type = "fine-tuning"
    id_prefix = "ftjob"
    params = TrainingConfig
    requires_vram_gb = 24
    #: run as a module of the installed package: no JSON quoted into a shell command
    entry_module = "openweights.jobs.fine_tuning.entry"

    def prepare(self, **kwargs: Any) -> Any:
        # The original's `requires_vram_gb=None`: allowed_hardware alone picks the GPU.
        if "requires_vram_gb" in kwargs and kwargs["requires_vram_gb"] is None:
            kwargs["requires_vram_gb"] = 0
        return super().prepare(**kwargs)

    def validate_params(self, **params: Any) -> BaseModel:
        validated = super().validate_params(**params)
        data = validated.model_dump()
        validated.finetuned_model_id = fill_name(validated.finetuned_model_id, data)
        return validated

    def get_entrypoint(self, validated_params: BaseModel) -> str:
        return f"python -m {self.entry_module}"

    #: what the training file is used for (see `openweights.validation.TRAINING_USES`)
    def _uses(self, cfg: Any) -> list[tuple[str, str]]:
        use = "sft" if cfg.loss == "sft" else "preference"
        out = [(cfg.training_file, use)]
        if cfg.test_file:
            out.append((cfg.test_file, "sft"))
        return out

    def create(self, **params: Any) -> Any:
        """Validate, check the data files' rows, upload what changed, submit; returns the `Job`
        (awaitable on async clients). See `TrainingConfig` for the parameters."""
        prepared = self.prepare(**params)
        cfg = self.params(**prepared.request.params["validated_params"])
        checks = [(fid, use) for fid, use in self._uses(cfg) if is_file_id(fid)]
        client = self._client
        responses_only = cfg.train_on_responses_only
        if inspect.iscoroutinefunction(client.files.retrieve):

            async def go() -> Any:
                for fid, use in checks:
                    meta = await client.files.retrieve(fid)
                    if meta.bytes <= CHECK_MAX_BYTES:
                        chunks = [c async for c in client.files.iter_content(fid)]
                        validate_training_lines(
                            iter_lines(chunks),
                            use,
                            filename=_display(meta),
                            responses_only=responses_only,
                        )
                return await client.jobs._submit(prepared)

            return go()
        for fid, use in checks:
            meta = client.files.retrieve(fid)
            if meta.bytes <= CHECK_MAX_BYTES:
                validate_training_lines(
                    iter_lines(client.files.iter_content(fid)),
                    use,
                    filename=_display(meta),
                    responses_only=responses_only,
                )
        return client.jobs._submit(prepared)


def _display(meta: Any) -> str:
    return f"{meta.filename} ({meta.id})"
