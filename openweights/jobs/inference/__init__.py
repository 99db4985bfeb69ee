"""`ow.inference`: batch inference over a conversations file; jsonl in, jsonl out with `completion`.

Client side only: validation and submission. The work runs on a worker as
`python -m openweights.jobs.inference.entry` (vLLM on CUDA, batched transformers elsewhere), which
reads its params from its own job. `job.outputs["file"]` is the id of the result file: each input
row plus `completion`, `finish_reason`, `prompt_tokens`, `completion_tokens` (and `logprobs`).
"""

from __future__ import annotations

from typing import Any

from openweights.client.custom_job import Jobs, register
from openweights.client.jobs import PreparedJob
from openweights.jobs.inference.params import InferenceConfig, guess_vram_gb

__all__ = ["Inference", "InferenceConfig", "guess_vram_gb"]


@register("inference")
class Inference(Jobs):
    type = "inference"
    #: the original's inference ids read `inferencejobs-…`; kept so ids look the same
    id_prefix = "inferencejobs"
    params = InferenceConfig
    requires_vram_gb = 0  # replaced by `guess_vram_gb` unless given
    entry_module = "openweights.jobs.inference.entry"

    def prepare(self, **kwargs: Any) -> PreparedJob:
        """As `Jobs.prepare`; `requires_vram_gb` defaults to the original's estimate ("guess")."""
        vram = kwargs.get("requires_vram_gb", "guess")
        if vram == "guess" or vram is None:
            kwargs["requires_vram_gb"] = guess_vram_gb(
                str(kwargs.get("model", "")), kwargs.get("quantization")
            )
        return super().prepare(**kwargs)

    def get_entrypoint(self, validated_params: Any) -> str:
        return f"python -m {self.entry_module}"
