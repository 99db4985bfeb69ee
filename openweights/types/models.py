"""The model registry on the wire. `/v1/models` answers in OpenAI's shape (`id`, `object`,
`created`, `owned_by`) with openweights' fields beside it, so the `openai` client lists them too."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelObject(BaseModel):
    id: str = Field(description="The model's name, e.g. the `finetuned_model_id` of its job.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["full", "adapter"] | None = Field(
        default=None,
        description="A full model, or a LoRA adapter (None: deployed, not registered).",
    )
    base_model: str | None = Field(default=None, description="What the job started from.")
    job_id: str | None = None
    run_id: int | None = None
    files: dict[str, str] = Field(
        default_factory=dict, description="Path under the model root → file id."
    )
    checkpoints: list[str] = Field(
        default_factory=list,
        description="Subfolders such as `checkpoint-10`: `name/checkpoint-10`.",
    )
    bytes: int = 0
    updated_at: float
    deployed: bool = Field(
        default=False, description="A running deployment serves it at `/v1/chat/completions`."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
