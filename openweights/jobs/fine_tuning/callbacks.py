"""Training callbacks (worker side): progress, divergence guard, logp tracking, sampling.

Every callback writes through one `EventBatcher`: events go out in batches, never one HTTP
call per metric.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["EventBatcher", "Diverged", "due", "make_callbacks"]


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

    def log_many(self, events: list[dict]) -> None:
        for e in events:
            self.log(e)

    def flush(self) -> None:
        if self.buffer:
            self.run.log_many(self.buffer)
            self.buffer = []
        self.last = time.monotonic()


class Diverged(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights."""


def due(step: int, every: int | str) -> bool:
    """Whether a callback with period `every` runs at `step`; "log": steps 1-9, 10, 20, … 90,
    100, 200, … (10^floor(log10(step)) apart)."""
    if step <= 0:
        return False
    if every == "log":
        return step % (10 ** int(math.log10(step))) == 0
    return step % int(every) == 0


def _trainable_finite(model: Any) -> bool:
    import torch

    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def make_callbacks(
    *,
    cfg: Any,
    events: EventBatcher,
    tokenizer: Any,
    ow: Any,
    logp_datasets: dict[str, list[dict]],
    sampling: list[tuple[Any, list[dict]]],
    work_dir: Path,
) -> list[Any]:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Progress and eval loss as events; a non-finite loss or non-finite weights about to
        be checkpointed stop the job (the checkpoints saved before stay)."""

        def __init__(self) -> None:
            self.t0 = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.monotonic()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None and not _trainable_finite(model):
                raise Diverged(
                    f"training diverged: weights are not finite at step {state.global_step}; "
                    "not saving this checkpoint"
                )

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            elapsed = time.monotonic() - self.t0
            step, total = state.global_step, state.max_steps
            data: dict[str, Any] = {"step": step, "total_steps": total}
            for key, value in logs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    data[key] = value if math.isfinite(value) else str(value)
            if "loss" in logs:
                data["type"] = "progress"
                tokens = getattr(state, "num_input_tokens_seen", 0) or 0
                if tokens:
                    data["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                if step:
                    data["eta_s"] = elapsed / step * max(total - step, 0)
                if not math.isfinite(float(logs["loss"])):
                    events.log({**data, "error": "loss is not finite"}, now=True)
                    raise Diverged(f"training diverged: loss is {logs['loss']} at step {step}")
            elif any(k.startswith("eval_") for k in logs):
                data["type"] = "eval"
            elif "train_runtime" in logs:
                data["type"] = "train_summary"
            events.log(data)

    class LogpTracking(TrainerCallback):
        """Per-row and per-tag mean token log-probabilities of each dataset, at step 0, every
        `eval_every_n_steps` and at the end; token-level results in uploads/logp/."""

        def __init__(self) -> None:
            self.done: set[int] = set()

        def run(self, model, step: int) -> None:
            from openweights.jobs.logprob.scoring import output_row, score_rows, summarize

            if step in self.done:
                return
            self.done.add(step)
            for name, rows in logp_datasets.items():
                results = score_rows(
                    model,
                    tokenizer,
                    rows,
                    batch_size=cfg.eval_batch_size,
                    max_length=cfg.max_seq_length,
                )
                path = Path("uploads") / "logp" / _safe(name) / f"step-{step}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "w") as f:
                    for row, res in zip(rows, results, strict=True):
                        f.write(json.dumps(output_row(row, res)) + "\n")
                events.log_many(summarize(name, results, step))
            events.flush()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.run(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if due(state.global_step, cfg.eval_every_n_steps):
                self.run(model, state.global_step)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.run(model, state.global_step)

    class Sampling(TrainerCallback):
        """Generations for a prompts file every `eval_steps` and at the end: a jsonl file with
        `completion` per row, uploaded at once, and an event `{type, tag, step, file, path}`."""

        def __init__(self, spec: Any, rows: list[dict]) -> None:
            self.spec = spec
            self.rows = rows
            self.done: set[int] = set()

        def run(self, model, step: int) -> None:
            if step in self.done:
                return
            self.done.add(step)
            completions = generate(
                model,
                tokenizer,
                [r["messages"] for r in self.rows],
                batch_size=self.spec.batch_size,
                temperature=self.spec.temperature,
                max_tokens=self.spec.max_tokens,
            )
            rel = f"samples/{_safe(self.spec.tag)}/step-{step}.jsonl"
            path = work_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for row, completion in zip(self.rows, completions, strict=True):
                    f.write(json.dumps({**row, "completion": completion}) + "\n")
            file_id = ow.files.upload(path, purpose="result").id
            events.log(
                {
                    "type": "samples",
                    "tag": self.spec.tag,
                    "step": step,
                    "file": file_id,
                    "path": rel,
                },
                now=True,
            )

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if due(state.global_step, self.spec.eval_steps):
                self.run(model, state.global_step)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.run(model, state.global_step)

    callbacks: list[Any] = [Progress()]
    if logp_datasets:
        callbacks.append(LogpTracking())
    callbacks += [Sampling(spec, rows) for spec, rows in sampling]
    return callbacks


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def generate(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict]],
    *,
    batch_size: int = 8,
    temperature: float = 0.0,
    max_tokens: int = 600,
    top_p: float = 1.0,
) -> list[str]:
    """Completions for chats; a trailing assistant message is a prefix the completion continues."""
    import torch

    from openweights.jobs.weighted_sft.blocks import plain_messages

    texts, prefixes = [], []
    for messages in conversations:
        msgs = plain_messages(messages)
        prefix = ""
        if msgs and msgs[-1]["role"] == "assistant":
            msgs, prefix = msgs[:-1], msgs[-1]["content"]
        texts.append(
            tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + prefix
        )
        prefixes.append(prefix)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    # a model unsloth patched for training generates in its inference mode, then goes back
    fast = _unsloth_model(model)
    if fast is not None:
        fast.for_inference(model)
    model.eval()
    out: list[str] = []
    try:
        device = next(model.parameters()).device
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_tokens,
                "do_sample": temperature > 0,
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            }
            if temperature > 0:
                kwargs.update(temperature=temperature, top_p=top_p)
            with torch.no_grad():
                seqs = model.generate(**enc, **kwargs)
            out += tokenizer.batch_decode(
                seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = side
        if fast is not None and was_training:
            fast.for_training(model)
        if was_training:
            model.train()
    return out


def _unsloth_model(model: Any) -> Any:
    """unsloth's `FastLanguageModel` when `model` is one it loaded (TRL tells them apart by
    `config.unsloth_version` too), else None; never imports unsloth for other models."""
    if not hasattr(getattr(model, "config", None), "unsloth_version"):
        return None
    from unsloth import FastLanguageModel

    return FastLanguageModel
