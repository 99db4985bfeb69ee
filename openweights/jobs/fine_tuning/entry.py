"""Worker side of `ow.fine_tuning`: `python -m openweights.jobs.fine_tuning.entry`.

Reads its params from its own job, trains with TRL + PEFT on transformers (CUDA when present,
float32 on CPU), writes progress and eval loss as batched events, and leaves the adapter (and the
merged model when `merge_before_push`) under `uploads/`, which the worker stores as the job's results.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from openweights.jobs.fine_tuning.params import TrainingConfig

UPLOADS = Path("uploads")


class EventBatcher:
    """Events go out in batches (one request per `flush_s` or `max_events`), never one per metric."""

    def __init__(self, run: Any, *, flush_s: float = 2.0, max_events: int = 200) -> None:
        self.run = run
        self.flush_s = flush_s
        self.max_events = max_events
        self.buffer: list[dict] = []
        self.last = time.monotonic()

    def log(self, data: dict, *, now: bool = False) -> None:
        self.buffer.append(data)
        if (
            now
            or len(self.buffer) >= self.max_events
            or time.monotonic() - self.last >= self.flush_s
        ):
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.run.log_many(self.buffer)
            self.buffer = []
        self.last = time.monotonic()


def load_rows(ow: Any, file_id: str) -> list[dict]:
    text = ow.files.content(file_id).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _has_generation_markers(tokenizer: Any) -> bool:
    template = tokenizer.chat_template or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def sft_dataset(rows: list[dict], tokenizer: Any, responses_only: bool):
    """Conversations → a TRL dataset. Responses-only training uses the template's generation
    markers when it has them, else trains on the final assistant turn (prompt/completion)."""
    from datasets import Dataset

    if all("text" in r and "messages" not in r for r in rows):
        return Dataset.from_list([{"text": r["text"]} for r in rows]), False
    messages = [{"messages": _plain(r["messages"])} for r in rows]
    if not responses_only or _has_generation_markers(tokenizer):
        return Dataset.from_list(messages), responses_only
    split = []
    for m in messages:
        msgs = m["messages"]
        if msgs[-1]["role"] != "assistant":
            raise ValueError(
                "train_on_responses_only needs conversations that end with an assistant turn"
            )
        split.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return Dataset.from_list(split), False


def _plain(messages: list[dict]) -> list[dict]:
    """Block-formatted content → plain strings (weights only matter for weighted_sft)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(b.get("text", "") for b in content)
        out.append({"role": m["role"], "content": content})
    return out


def preference_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": _plain(r["prompt"]),
                "chosen": _plain(r["chosen"]),
                "rejected": _plain(r["rejected"]),
            }
            for r in rows
        ]
    )


def optimizer_name(requested: str, cuda: bool) -> tuple[str, str | None]:
    """Map the original's names to transformers'; 8-bit Adam needs bitsandbytes on CUDA."""
    if requested == "adamw_8bit":
        if cuda:
            try:
                import bitsandbytes  # noqa: F401

                return "adamw_bnb_8bit", None
            except ImportError:
                pass
        return "adamw_torch", "adamw_8bit needs bitsandbytes on CUDA: using adamw_torch"
    return {"adamw": "adamw_torch", "adam": "adamw_torch", "sgd": "sgd"}.get(
        requested, requested
    ), None


def make_callback(events: EventBatcher, cfg: TrainingConfig):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Training progress and eval loss as events; a NaN loss stops the job with a reason."""

        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.tokens = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            elapsed = time.monotonic() - self.t0
            step, total = state.global_step, state.max_steps
            data: dict[str, Any] = {"step": step, "total_steps": total}
            for key, value in logs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    data[key] = value
            if "loss" in logs:
                data["type"] = "progress"
                tokens = getattr(state, "num_input_tokens_seen", 0) or 0
                if tokens:
                    data["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                if step:
                    data["eta_s"] = elapsed / step * max(total - step, 0)
                if not math.isfinite(float(logs["loss"])):
                    events.log({**data, "error": "loss is not finite"}, now=True)
                    raise FloatingPointError(
                        f"training diverged: loss is {logs['loss']} at step {step}"
                    )
            elif any(k.startswith("eval_") for k in logs):
                data["type"] = "eval"
            events.log(data)

    return Progress()


def train(cfg: TrainingConfig, ow: Any, events: EventBatcher) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    device = "cuda" if cuda else "cpu"
    optim, note = optimizer_name(cfg.optim, cuda)
    events.log(
        {
            "type": "engine",
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "optim": optim,
            "note": note or ("CPU: training in float32" if not cuda else None),
        },
        now=True,
    )
    if cfg.load_in_4bit and not cuda:
        raise RuntimeError(
            "load_in_4bit needs a CUDA GPU (bitsandbytes); set load_in_4bit=False on CPU"
        )

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if cfg.chat_template != "default":
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **model_kwargs)

    peft_config = None
    if cfg.is_peft:
        peft_config = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            bias=cfg.lora_bias,
            use_rslora=cfg.use_rslora,
            task_type="CAUSAL_LM",
        )
    eval_steps = cfg.test_file_eval_steps or (
        cfg.eval_every_n_steps if isinstance(cfg.eval_every_n_steps, int) else None
    )
    common = dict(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_steps,
        learning_rate=float(cfg.learning_rate),
        logging_steps=cfg.logging_steps,
        optim=optim,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        seed=cfg.seed,
        save_steps=cfg.save_steps,
        save_strategy="steps",
        report_to="none",
        bf16=dtype == torch.bfloat16,
        use_cpu=not cuda,
        disable_tqdm=True,
        gradient_checkpointing=cuda,  # on CPU it only slows small models down
        include_num_input_tokens_seen=True,
    )
    eval_dataset = None
    if cfg.test_file:
        eval_dataset, _ = sft_dataset(
            load_rows(ow, cfg.test_file), tokenizer, cfg.train_on_responses_only
        )
        common["eval_strategy"] = "steps" if eval_steps else cfg.test_file_eval_strategy
        if eval_steps:
            common["eval_steps"] = eval_steps

    rows = load_rows(ow, cfg.training_file)
    callback = make_callback(events, cfg)
    if cfg.loss == "sft":
        from trl import SFTConfig, SFTTrainer

        dataset, assistant_only = sft_dataset(rows, tokenizer, cfg.train_on_responses_only)
        args = SFTConfig(
            **common,
            max_length=cfg.max_seq_length,
            packing=cfg.packing,
            assistant_only_loss=assistant_only,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[callback],
        )
    elif cfg.loss == "dpo":
        from trl import DPOConfig, DPOTrainer

        common.pop("eval_strategy", None), common.pop("eval_steps", None)
        args = DPOConfig(**common, beta=cfg.beta, max_length=cfg.max_seq_length)
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=preference_dataset(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[callback],
        )
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        common.pop("eval_strategy", None), common.pop("eval_steps", None)
        args = ORPOConfig(**common, beta=cfg.beta, max_length=cfg.max_seq_length)
        trainer = ORPOTrainer(
            model=model,
            args=args,
            train_dataset=preference_dataset(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[callback],
        )

    result = trainer.train()
    events.flush()
    adapter_dir = UPLOADS / ("adapter" if cfg.is_peft else "model")
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    out: dict[str, Any] = {
        "train_loss": result.training_loss,
        "global_step": result.global_step,
        "adapter_dir" if cfg.is_peft else "model_dir": adapter_dir.as_posix(),
    }
    if cfg.is_peft and cfg.merge_before_push:
        merged = trainer.model.merge_and_unload()
        merged_dir = UPLOADS / "merged"
        merged.save_pretrained(str(merged_dir))
        tokenizer.save_pretrained(str(merged_dir))
        out["merged_dir"] = merged_dir.as_posix()
    return out


def main() -> int:
    from openweights import OpenWeights

    ow = OpenWeights()
    job = ow.jobs.retrieve(os.environ["OPENWEIGHTS_JOB_ID"])
    cfg = TrainingConfig(**job.params["validated_params"])
    events = EventBatcher(ow.run)
    UPLOADS.mkdir(exist_ok=True)
    t0 = time.monotonic()
    try:
        out = train(cfg, ow, events)
    finally:
        events.flush()
    ow.run.log(
        {
            "type": "result",
            "finetuned_model_id": cfg.finetuned_model_id,
            "train_seconds": round(time.monotonic() - t0, 3),
            **out,
        }
    )
    print(f"fine-tuned {cfg.model} → {cfg.finetuned_model_id}: {json.dumps(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
