"""Which training engine a fine-tune uses on this worker: a pure decision, no heavy imports.

```
choose_engine(use_unsloth, load_in_4bit, ..., cuda, bf16, unsloth_available, bnb_available)
  CPU                      → transformers, float32, never 4-bit (both asks noted as ignored)
  CUDA, unsloth importable → unsloth (a new LoRA; loss "sft" in auto mode), bf16 when supported
  CUDA otherwise           → transformers (+ bitsandbytes 4-bit when load_in_4bit)
```

The probes (`is_unsloth_available`, `is_bitsandbytes_available`) look for the package without
importing it: importing unsloth patches transformers, TRL and PEFT, so it happens only in the
job that trains with it, before those are imported (see `entry.train`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Engine",
    "EngineError",
    "choose_engine",
    "is_bitsandbytes_available",
    "is_unsloth_available",
]

UNSLOTH_HINT = 'pip install "openweights[unsloth]"'
BNB_HINT = 'pip install "openweights[bnb]"'


class EngineError(RuntimeError):
    """What the job asked for cannot run on this worker; the message says how to fix it."""


def is_unsloth_available() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def is_bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


@dataclass(frozen=True)
class Engine:
    """The resolved engine, as the job's `engine` event reports it."""

    name: Literal["unsloth", "transformers"]
    device: Literal["cuda", "cpu"]
    #: the weights' dtype (the compute dtype when 4-bit)
    dtype: Literal["bfloat16", "float16", "float32"]
    load_in_4bit: bool
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}+trl+peft"


def choose_engine(
    *,
    use_unsloth: bool | None,
    load_in_4bit: bool,
    loss: str,
    is_peft: bool,
    from_adapter: bool,
    cuda: bool,
    bf16: bool,
    unsloth_available: bool,
    bnb_available: bool,
) -> Engine:
    """Pick the engine from the job's asks and this worker's probes.

    `use_unsloth`: None = auto (on CUDA when installed, for a new LoRA with loss "sft"), True =
    required on CUDA (any loss; the job fails if unsloth is missing), False = never."""
    if not cuda:
        notes = ["CPU: training in float32"]
        if load_in_4bit:
            notes.append(
                "load_in_4bit ignored: 4-bit needs CUDA and bitsandbytes; loading in float32"
            )
        if use_unsloth:
            notes.append("use_unsloth ignored: unsloth needs CUDA")
        return Engine("transformers", "cpu", "float32", False, notes)

    notes: list[str] = []
    new_lora = is_peft and not from_adapter
    if use_unsloth:
        if not unsloth_available:
            raise EngineError(
                f"use_unsloth=True but unsloth is not installed on this CUDA worker: {UNSLOTH_HINT}, "
                "or leave use_unsloth unset (auto) to train with transformers"
            )
        if not new_lora:
            raise EngineError(
                "use_unsloth=True needs a new LoRA on a base model (is_peft=True and `model` not a "
                "LoRA adapter); leave use_unsloth unset (auto) to train with transformers"
            )
        unsloth = True
    elif use_unsloth is None and unsloth_available:
        unsloth = new_lora and loss == "sft"
        if not unsloth:
            why = (
                f'loss="{loss}" (set use_unsloth=True to use it)'
                if new_lora
                else "it only trains a new LoRA on a base model"
            )
            notes.append(f"unsloth installed but not used: {why}")
    else:
        unsloth = False
    if load_in_4bit and not unsloth and not bnb_available:
        raise EngineError(f"load_in_4bit=True needs bitsandbytes on this CUDA worker: {BNB_HINT}")
    # GPUs without bf16: float32 on the plain path (as before), float16 + fp16 autocast with
    # unsloth, as its own notebooks set up those GPUs.
    dtype = "bfloat16" if bf16 else ("float16" if unsloth else "float32")
    return Engine("unsloth" if unsloth else "transformers", "cuda", dtype, load_in_4bit, notes)
