"""`ow.logprob`: score a dataset's log-probabilities under a model, without training.

```python
job = ow.logprob.create(model="org/model-or-adapter", dataset=file_id).wait()
rows = [json.loads(l) for l in ow.files.content(job.outputs["file"]).decode().splitlines()]
rows[0]["logprobs"]["mean"]            # mean token log-probability of the assistant turns
rows[0]["logprobs"]["tags"]["maximize"]  # {"mean", "sum", "n_tokens"} over blocks tagged so
rows[0]["messages"][1]["content"][0]["logprob"]   # per block (block-formatted rows)
```

The result file (purpose `result`) has one row per input row: the row, its blocks annotated with
`logprob` (sum), `logprob_mean` and `n_tokens`, and `logprobs` with the row's mean, its tags and
every token (`token_id`, `token`, `logp`, `block`). Events: one `logp` event per row and per row
and tag, one `logp_mean` per tag (the same as the training jobs' `logp_callback_datasets`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from openweights.client.custom_job import Jobs, register

__all__ = ["LogProb", "LogProbConfig"]


class LogProbConfig(BaseModel):
    """`ow.logprob.create(...)` parameters (the original's names and defaults)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="Hub id, local path, registered model, LoRA adapter or checkpoint."
    )
    dataset: str = Field(description="File id of a conversations (or weighted) file.")
    batch_size: int = Field(default=8, ge=1)
    chat_template: str = Field(default="default", description='"default": the tokenizer\'s own.')
    max_length: int | None = Field(
        default=None, ge=2, description="Tokens past this are not scored; None: all."
    )
    with_tokens: bool = Field(default=True, description="Write every token's log-probability.")

    @field_validator("dataset")
    @classmethod
    def _purpose(cls, v: str) -> str:
        if ":file-" in v and v.split(":", 1)[0] not in ("conversations", "weighted_conversations"):
            raise ValueError(f"dataset: must be a 'conversations' file, got {v!r}")
        return v


@register("logprob")
class LogProb(Jobs):
    type = "logprob"
    id_prefix = "lpjob"
    params = LogProbConfig
    requires_vram_gb = 24

    def get_entrypoint(self, validated_params: BaseModel) -> str:
        return "python -m openweights.jobs.logprob.entry"
