"""Batch-inference parameters, as the original openweights names and defaults them (`InferenceConfig`).

Beyond the original: `seed`, `engine`, `max_num_seqs` and `save_every_s`, and `min_tokens` is honoured.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["OPENAI_PREFIX", "InferenceConfig", "guess_vram_gb"]

#: vLLM returns at most this many top log-probabilities per token.
MAX_LOGPROBS = 20
#: `model="openai/gpt-4o-mini"`: the rows go to OpenAI's Batch API (see `openai_batch`).
OPENAI_PREFIX = "openai/"


class InferenceConfig(BaseModel):
    """`ow.inference.create(...)` parameters. Defaults follow the original openweights."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="Hub id, local path (model or LoRA adapter dir), a model made by an "
        "earlier fine-tune (its `finetuned_model_id`, or `<id>/checkpoint-N`), or "
        "`openai/<model>`: OpenAI's Batch API with the org's OPENAI_API_KEY (and OPENAI_BASE_URL)."
    )
    input_file_id: str = Field(
        description='A conversations file: one `{"messages": [...]}` or `{"text": ...}` per line. '
        "A conversation that ends with an assistant message is continued."
    )
    chat_template: str = Field(default="default", description='"default": the tokenizer\'s own.')
    job_id_suffix: str | None = Field(default=None, description="Forces a distinct job.")
    use_batch: bool = Field(default=True, description="Kept for compatibility; always batched.")
    max_tokens: int = Field(default=600, ge=1, description="New tokens per completion, at most.")
    temperature: float = Field(default=1.0, ge=0, description="0: greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] = Field(
        default_factory=list, description="Stop strings; the completion ends before the first one."
    )
    prefill: str = Field(
        default="",
        description="Text the assistant's answer starts with (continued, not repeated in "
        "`completion`); ignored for rows that already end with an assistant message.",
    )
    min_tokens: int = Field(
        default=1, ge=0, description="New tokens before EOS or a stop string may end a completion."
    )
    max_model_len: int = Field(
        default=8196, ge=2, description="Prompt + completion tokens, at most."
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Top log-probabilities per generated token (0: only the sampled token's).",
    )
    n_completions_per_prompt: int = Field(default=1, ge=1, le=1000)
    quantization: str | None = Field(
        default=None,
        description='vLLM quantization; "bitsandbytes" when the model name has "4bit".',
    )
    load_format: str | None = Field(default=None, description="vLLM load format.")
    seed: int | None = Field(default=None, description="Sampling seed (per row on vLLM).")
    engine: Literal["auto", "vllm", "transformers", "openai"] = Field(
        default="auto",
        description="auto: OpenAI's Batch API for `openai/` models, else vLLM on CUDA when "
        "installed, else batched transformers.",
    )
    max_num_seqs: int = Field(
        default=32, ge=1, le=4096, description="Sequences per batch, at most."
    )
    save_every_s: float = Field(
        default=30.0,
        ge=0,
        description="Upload finished rows at least this often, so a retry does not redo them.",
    )

    @model_validator(mode="after")
    def _check(self) -> InferenceConfig:
        fid = self.input_file_id
        if ":file-" not in fid:
            raise ValueError(
                f"input_file_id: {fid!r} is not a file id; upload the file first: "
                "ow.files.upload(path, purpose='conversations')['id']."
            )
        if not fid.startswith("conversations:"):
            raise ValueError(
                f"input_file_id: inference reads a 'conversations' file, got a "
                f"{fid.split(':', 1)[0]!r} file ({fid}); upload it with purpose='conversations'."
            )
        if self.max_tokens >= self.max_model_len:
            raise ValueError(
                f"max_tokens: {self.max_tokens} leaves no room for a prompt within "
                f"max_model_len={self.max_model_len}; lower max_tokens or raise max_model_len."
            )
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens: {self.min_tokens} is more than max_tokens={self.max_tokens}."
            )
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must not be empty.")
        if self.model.startswith(OPENAI_PREFIX) or self.engine == "openai":
            self._check_openai()
        if self.quantization is None and "4bit" in self.model.lower():
            self.quantization = "bitsandbytes"
        if self.load_format is None and "4bit" in self.model.lower():
            self.load_format = "bitsandbytes"
        return self

    def _check_openai(self) -> None:
        if not self.model.startswith(OPENAI_PREFIX) or len(self.model) == len(OPENAI_PREFIX):
            raise ValueError(
                f'engine: "openai" runs `openai/<model>` models only, got model={self.model!r}.'
            )
        if self.engine not in ("auto", "openai"):
            raise ValueError(
                f"engine: {self.model!r} runs on OpenAI's Batch API, not {self.engine}."
            )
        unsupported = {
            "prefill": self.prefill != "",
            "min_tokens": self.min_tokens > 1,
            "quantization": self.quantization is not None,
            "load_format": self.load_format is not None,
        }
        for name, used in unsupported.items():
            if used:
                raise ValueError(f"{name}: OpenAI's API has no such option (model {self.model!r}).")
        if len(self.stop) > 4:
            raise ValueError(f"stop: OpenAI takes at most 4 stop strings, got {len(self.stop)}.")


# a size is its own dash-separated part of the name ("Qwen3-4B", "llama-3-8b-Instruct"), so a job
# id's hex digits ("ftjob-3f2a123456b0") never read as billions of parameters
_SIZE = re.compile(r"(?:^|[-_/.])(\d+(?:\.\d+)?)[bB](?=$|[-_/.])")
_JOB_ID = re.compile(r"[a-z]+-[0-9a-f]{8,}")


def guess_vram_gb(model: str, quantization: str | None = None) -> float:
    """The original's estimate: 2 GB per billion parameters (÷2 for 8-bit, ÷4 for 4-bit) + 15 GB
    for the KV cache; the size comes from a local model's weight files or a `7B` in the name
    (32B when neither says)."""
    if model.startswith(OPENAI_PREFIX):
        return 0.0  # the job only talks to OpenAI's API
    path = Path(model).expanduser()
    weights = (
        [p for p in path.glob("*") if p.suffix in (".safetensors", ".bin")] if path.is_dir() else []
    )
    if weights:
        gb = sum(p.stat().st_size for p in weights) / 1e9
        # a tiny local model needs no 15 GB cache: scale the cache with the weights
        return round(gb + min(15.0, 1.0 + gb), 1)
    named = _JOB_ID.sub("", model)
    m = _SIZE.search(named.rsplit("/", 1)[-1]) or _SIZE.search(named)
    billions = float(m.group(1)) if m else 32.0
    gb = 2 * billions
    q = (quantization or "").lower()
    name = model.lower()
    if "4bit" in name or q in ("bitsandbytes", "awq", "gptq") or "int4" in q:
        gb /= 4
    elif "8bit" in name or "fp8" in q or "int8" in q:
        gb /= 2
    return round(gb + 15, 1)
