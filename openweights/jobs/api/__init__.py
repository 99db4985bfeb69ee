"""The `api` job kind: an OpenAI-compatible deployment of one base model and its LoRA adapters.

Client side only. Users deploy through `ow.api.deploy(...)` (`openweights.client.api`), which
submits this kind; the worker runs `python -m openweights.jobs.api.entry`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from openweights.client.custom_job import Jobs

__all__ = ["ApiConfig", "ApiJobs", "estimate_vram_gb"]

#: Default idle timeout: a deployment nobody calls (and no `up()` holds) stops after this.
DEFAULT_IDLE_TIMEOUT_S = 900.0


class ApiConfig(BaseModel):
    """Parameters of a deployment (names and defaults as the original's `ApiConfig`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="Base model or LoRA adapter: Hub id, local path, registered model."
    )
    lora_adapters: list[str] = Field(
        default_factory=list, description="LoRA adapters of `model` served by the same server."
    )
    max_lora_rank: int = Field(default=16, ge=1)
    max_loras: int | None = Field(default=None, ge=1, description="None: the number of adapters.")
    max_model_len: int = Field(default=2048, ge=16)
    max_num_seqs: int = Field(default=16, ge=1)
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    engine: str = Field(default="auto", description='"auto", "vllm" or "transformers".')
    idle_timeout_s: float = Field(
        default=DEFAULT_IDLE_TIMEOUT_S,
        gt=0,
        description="Stop after this long without requests (a client holding `up()` keeps it alive).",
    )

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        if v not in ("auto", "vllm", "transformers"):
            raise ValueError(f'engine must be "auto", "vllm" or "transformers", got {v!r}')
        return v

    @property
    def models(self) -> list[str]:
        return [self.model, *[a for a in self.lora_adapters if a != self.model]]


def _weights_gb(model: str) -> float | None:
    """Size of the weights of a local model directory (LoRA adapters: of their base)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    cfg = path / "adapter_config.json"
    if cfg.is_file():
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
        return _weights_gb(base) if base else None
    files = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    return sum(f.stat().st_size for f in files) / 1e9 if files else None


def estimate_vram_gb(
    model: str, *, quantization: str | None = None, lora_rank: int = 0, n_adapters: int = 0
) -> int:
    """VRAM a deployment asks for when `requires_vram_gb` is not given.

    weights (bytes of a local model's safetensors; else 2 GB per billion parameters read from the
    name, like `Qwen3-4B`, halved for 8-bit and quartered for 4-bit quantization; 32B when the
    name tells nothing) + 15 GB for KV cache and activations + `lora_rank/16` GB when adapters
    are served. Pass `requires_vram_gb` (or `allowed_hardware`) when you know better.
    """
    weights = _weights_gb(model)
    if weights is None:
        found = re.findall(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", model.split("/")[-1] or model)
        params_b = float(found[-1]) if found else 32.0
        weights = 2 * params_b
        q = (quantization or "").lower()
        if "4" in q or "awq" in q or "gptq" in q or "4bit" in model.lower():
            weights /= 4
        elif "8" in q or "fp8" in q or "8bit" in model.lower():
            weights /= 2
    extra = lora_rank / 16 if n_adapters else 0
    return math.ceil(weights + 15 + extra)


class ApiJobs(Jobs):
    """Submits `api` jobs; reached through `ow.api` (`openweights.client.api`), not `ow.<kind>`."""

    type = "api"
    id_prefix = "apijob"
    params = ApiConfig
    requires_vram_gb = 24

    def get_entrypoint(self, validated_params: BaseModel) -> str:
        return "python -m openweights.jobs.api.entry"

    def prepare(self, **kwargs: Any):  # type: ignore[override]
        if kwargs.get("requires_vram_gb") in (None, "guess"):
            kwargs.pop("requires_vram_gb", None)
            if not kwargs.get("allowed_hardware"):
                kwargs["requires_vram_gb"] = estimate_vram_gb(
                    kwargs["model"],
                    quantization=kwargs.get("quantization"),
                    lora_rank=kwargs.get("max_lora_rank") or 16,
                    n_adapters=len(kwargs.get("lora_adapters") or []),
                )
            else:
                kwargs["requires_vram_gb"] = 0
        return super().prepare(**kwargs)
