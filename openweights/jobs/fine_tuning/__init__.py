"""`ow.fine_tuning`: LoRA (or full) SFT, DPO and ORPO with TRL + PEFT on transformers.

Client side only: validation and submission. The training runs on a worker as
`python -m openweights.jobs.fine_tuning.entry`, which reads its params from its own job.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel

from openweights.client.custom_job import Jobs, register
from openweights.jobs.fine_tuning.params import SamplingCallback, TrainingConfig

__all__ = ["FineTuning", "SamplingCallback", "TrainingConfig"]


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

    def validate_params(self, **params: Any) -> BaseModel:
        validated = super().validate_params(**params)
        data = validated.model_dump()
        validated.finetuned_model_id = fill_name(validated.finetuned_model_id, data)
        return validated

    def get_entrypoint(self, validated_params: BaseModel) -> str:
        return f"python -m {self.entry_module}"
