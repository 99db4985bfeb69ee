"""Worker side of `ow.fine_tuning` (and `ow.weighted_sft`): `python -m openweights.jobs.fine_tuning.entry`.

Reads its params from its own job, checks its data (file, line, field), loads the model through
`openweights.jobs.model_source` (Hub id, local path, registered model, LoRA adapter or
checkpoint), trains with TRL + PEFT on transformers (CUDA when present, float32 on CPU; unsloth
and bitsandbytes 4-bit on CUDA when installed and asked, see `_engine.py`), and writes events
in batches; the first is `{"type": "engine", "engine", "device", "dtype", "load_in_4bit",
"unsloth", "note"}`. Outputs, all under `uploads/model/` (stored as the job's results):

- the final model: the merged full model when `is_peft and merge_before_push` (then the LoRA
  adapter too, at `uploads/model/adapter/`), else the LoRA adapter (or the full model when
  `is_peft=False`);
- every `save_steps` checkpoint at `uploads/model/checkpoint-<step>/` (TRL's own saving);
- then one event `{"type": "model", "name", "base_model", "prefix": "uploads/model", "kind"}`
  from which the server registers the model.

Starting from a LoRA adapter (or a checkpoint of one): with `is_peft` the adapter itself goes on
training (its own rank, alpha and target modules win over `r`, `lora_alpha`, `target_modules`),
so the result is an adapter on the same base; with `is_peft=False` it is merged into its base
first and the whole model is trained.

A non-finite loss (or non-finite weights about to be checkpointed) fails the job with that
reason; the checkpoints saved before it stay and are uploaded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from openweights.jobs.fine_tuning._engine import EngineError
from openweights.jobs.fine_tuning.callbacks import Diverged, EventBatcher, make_callbacks
from openweights.jobs.fine_tuning.params import DEFAULT_TARGET_MODULES, OUTPUT_DIR, TrainingConfig

__all__ = ["EventBatcher", "main", "train"]

UPLOADS = Path("uploads")
MODEL_DIR = Path(OUTPUT_DIR)


class DataError(ValueError):
    """A training row that cannot be used; the message names file, line and field."""


# ---------------------------------------------------------------- data


def load_rows(ow: Any, file_id: str) -> tuple[list[dict], str]:
    """(rows, display name) of a file id or local path; blank lines skipped."""
    if os.path.exists(file_id):
        text, name = Path(file_id).read_text(), file_id
    else:
        text = ow.files.content(file_id).decode("utf-8")
        try:
            name = f"{ow.files.retrieve(file_id).filename} ({file_id})"
        except Exception:
            name = file_id
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            row = json.loads(line)
            row["__line__"] = number
            rows.append(row)
    return rows, name


def _line(row: dict) -> int:
    return row.get("__line__", 0)


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "__line__"}


def check_rows(rows: list[dict], name: str, use: str, cfg: TrainingConfig) -> None:
    from openweights.validation import training_row_problem

    for row in rows:
        problem = training_row_problem(row, use, responses_only=cfg.train_on_responses_only)
        if problem:
            raise DataError(f"{name} line {_line(row)}, field {problem[0]}: {problem[1]}")


def check_conversations(rows: list[dict], name: str) -> None:
    """Callback datasets (scored or sampled) need chats, not `{"text": ...}` rows."""
    for row in rows:
        if not isinstance(row.get("messages"), list):
            raise DataError(
                f"{name} line {_line(row)}, field messages: required (a list of messages)"
            )


def check_lengths(rows: list[dict], name: str, tokenizer: Any, cfg: TrainingConfig, use: str):
    """With truncation off, a row longer than max_seq_length fails the job before training."""
    from openweights.jobs.weighted_sft.blocks import plain_messages

    if cfg.truncation:
        return
    for row in rows:
        if use == "preference":
            seqs = {
                key: plain_messages(row["prompt"]) + plain_messages(row[key])
                for key in ("chosen", "rejected")
            }
        elif "messages" in row:
            seqs = {"messages": plain_messages(row["messages"])}
        else:
            n = len(tokenizer(row["text"], add_special_tokens=False)["input_ids"])
            seqs, field = {}, "text"
            if n > cfg.max_seq_length:
                raise DataError(_too_long(name, row, field, n, cfg))
        for field, messages in seqs.items():
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > cfg.max_seq_length:
                raise DataError(_too_long(name, row, field, n, cfg))


def _too_long(name: str, row: dict, field: str, n: int, cfg: TrainingConfig) -> str:
    return (
        f"{name} line {_line(row)}, field {field}: {n} tokens, longer than "
        f"max_seq_length={cfg.max_seq_length} and truncation=False; raise max_seq_length, "
        "shorten the row, or set truncation=True"
    )


def _has_generation_markers(tokenizer: Any) -> bool:
    template = tokenizer.chat_template or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def sft_dataset(rows: list[dict], tokenizer: Any, responses_only: bool):
    """Conversations → a TRL dataset. Responses-only training uses the template's generation
    markers when it has them (TRL swaps in a marked template for the families it knows), else
    trains on the final assistant turn (prompt/completion)."""
    from datasets import Dataset

    from openweights.jobs.weighted_sft.blocks import plain_messages

    if all("text" in r and "messages" not in r for r in rows):
        return Dataset.from_list([{"text": r["text"]} for r in rows]), False
    messages = [{"messages": plain_messages(r["messages"])} for r in rows]
    if not responses_only or _has_generation_markers(tokenizer):
        return Dataset.from_list(messages), responses_only
    split = []
    for m in messages:
        msgs = m["messages"]
        last = max(i for i, x in enumerate(msgs) if x["role"] == "assistant")
        split.append({"prompt": msgs[:last], "completion": msgs[last : last + 1]})
    return Dataset.from_list(split), False


def preference_dataset(rows: list[dict]):
    from datasets import Dataset

    from openweights.jobs.weighted_sft.blocks import plain_messages

    return Dataset.from_list(
        [
            {
                "prompt": plain_messages(r["prompt"]),
                "chosen": plain_messages(r["chosen"]),
                "rejected": plain_messages(r["rejected"]),
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


# ---------------------------------------------------------------- model


def base_reference(cfg_model: str, source: Any) -> str:
    """What a saved adapter names as its base: a reference that resolves on any worker (the
    registered or Hub id, or an absolute local path), never a worker's cache directory."""
    if source.adapter:
        config = json.loads(Path(source.adapter, "adapter_config.json").read_text())
        return config.get("base_model_name_or_path") or source.base
    if Path(cfg_model).expanduser().is_dir():
        return str(Path(cfg_model).expanduser().resolve())
    return cfg_model


def point_adapters_at(base_ref: str, root: Path) -> None:
    for config_path in root.rglob("adapter_config.json"):
        config = json.loads(config_path.read_text())
        if config.get("base_model_name_or_path") != base_ref:
            config["base_model_name_or_path"] = base_ref
            config_path.write_text(json.dumps(config, indent=2))


def train(cfg: TrainingConfig, ow: Any, events: EventBatcher, *, weighted: bool = False) -> dict:
    import torch

    from openweights.jobs.fine_tuning._engine import (
        choose_engine,
        is_bitsandbytes_available,
        is_unsloth_available,
    )
    from openweights.jobs.model_source import load_model, resolve_model

    cuda = torch.cuda.is_available()
    source = resolve_model(cfg.model, ow=ow)
    continue_adapter = bool(source.adapter) and cfg.is_peft
    engine = choose_engine(
        use_unsloth=cfg.use_unsloth,
        load_in_4bit=cfg.load_in_4bit,
        loss=cfg.loss,
        is_peft=cfg.is_peft,
        from_adapter=bool(source.adapter),
        cuda=cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        unsloth_available=cuda and is_unsloth_available(),
        bnb_available=cuda and is_bitsandbytes_available(),
    )
    if engine.name == "unsloth":
        # Before transformers, TRL and PEFT are imported: unsloth patches them on import.
        import unsloth  # noqa: F401
    from peft import LoraConfig
    from transformers import AutoTokenizer

    dtype = getattr(torch, engine.dtype)
    optim, note = optimizer_name(cfg.optim, cuda)
    notes = [n for n in (note,) if n] + engine.notes
    if source.adapter:
        notes.append(
            "starting from a LoRA adapter: "
            + (
                "training it further (its rank, alpha and target modules are kept)"
                if continue_adapter
                else "merged into its base, then the full model is trained"
            )
        )
    events.log(
        {
            "type": "engine",
            "device": engine.device,
            "dtype": engine.dtype,
            "load_in_4bit": engine.load_in_4bit,
            "unsloth": engine.name == "unsloth",
            "optim": optim,
            "engine": engine.label,
            "base": source.base,
            "adapter": source.adapter,
            "note": "; ".join(notes) or None,
        },
        now=True,
    )

    # Data first: a bad row fails the job before the model is loaded.
    use = "weighted_sft" if weighted else ("sft" if cfg.loss == "sft" else "preference")
    rows, name = load_rows(ow, cfg.training_file)
    check_rows(rows, name, use, cfg)
    test_rows, test_name = load_rows(ow, cfg.test_file) if cfg.test_file else ([], "")
    check_rows(test_rows, test_name, "weighted_sft" if weighted else "sft", cfg)
    tok_source = (
        source.adapter
        if source.adapter and Path(source.adapter, "tokenizer_config.json").exists()
        else source.base
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_source)
    if cfg.chat_template != "default":
        tokenizer.chat_template = cfg.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_lengths(rows, name, tokenizer, cfg, use)
    check_lengths(test_rows, test_name, tokenizer, cfg, "sft")
    logp_datasets = {}
    for label, fid in cfg.logp_callback_datasets.items():
        logp_rows, logp_name = load_rows(ow, fid)
        check_conversations(logp_rows, logp_name)
        logp_datasets[label] = [_strip(r) for r in logp_rows]
    sampling = []
    for spec in cfg.sampling_callbacks or []:
        prompt_rows, prompt_name = load_rows(ow, spec.dataset)
        check_conversations(prompt_rows, prompt_name)
        sampling.append((spec, [_strip(r) for r in prompt_rows]))
    rows, test_rows = [_strip(r) for r in rows], [_strip(r) for r in test_rows]

    peft_config = None
    if engine.name == "unsloth":
        from unsloth import FastLanguageModel

        # Our tokenizer stays (its chat template is what the rows were checked with).
        model, _ = FastLanguageModel.from_pretrained(
            model_name=source.base,
            max_seq_length=cfg.max_seq_length,
            dtype=dtype,
            load_in_4bit=engine.load_in_4bit,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=cfg.r,
            target_modules=cfg.target_modules or list(DEFAULT_TARGET_MODULES),
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            bias=cfg.lora_bias,
            use_gradient_checkpointing="unsloth",
            random_state=cfg.seed,
            use_rslora=cfg.use_rslora,
        )
    else:
        model_kwargs: dict[str, Any] = {}
        if engine.load_in_4bit:
            from transformers import BitsAndBytesConfig

            model_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            model_kwargs["device_map"] = {"": torch.cuda.current_device()}
        model, _ = load_model(
            source,
            dtype=dtype,
            merge=bool(source.adapter) and not cfg.is_peft,
            trainable_adapter=continue_adapter,
            **model_kwargs,
        )
        if engine.load_in_4bit and weighted:
            # TRL's trainers prepare a k-bit model themselves; our weighted Trainer does not.
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        if cfg.is_peft and not continue_adapter:
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
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = dict(
        output_dir=str(MODEL_DIR),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_steps,
        learning_rate=float(cfg.learning_rate),
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not averaged away
        optim=optim,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        save_steps=cfg.save_steps,
        save_strategy="steps",
        save_only_model=True,
        report_to="none",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not cuda,
        disable_tqdm=True,
        # on CPU it only slows small models down; unsloth has set up its own
        gradient_checkpointing=cuda and engine.name != "unsloth",
        include_num_input_tokens_seen=True,
    )
    if test_rows and cfg.loss == "sft":
        common["eval_strategy"] = "steps" if eval_steps else cfg.test_file_eval_strategy
        if eval_steps:
            common["eval_steps"] = eval_steps
    callbacks = make_callbacks(
        cfg=cfg,
        events=events,
        tokenizer=tokenizer,
        ow=ow,
        logp_datasets=logp_datasets,
        sampling=sampling,
        work_dir=Path("callbacks"),
    )
    if weighted:
        from openweights.jobs.weighted_sft.trainer import make_trainer

        trainer = make_trainer(
            cfg=cfg,
            model=model,
            tokenizer=tokenizer,
            rows=rows,
            test_rows=test_rows,
            peft_config=peft_config,
            args=common,
            callbacks=callbacks,
        )
    elif cfg.loss == "sft":
        from trl import SFTConfig, SFTTrainer

        dataset, assistant_only = sft_dataset(rows, tokenizer, cfg.train_on_responses_only)
        eval_dataset = (
            sft_dataset(test_rows, tokenizer, cfg.train_on_responses_only)[0] if test_rows else None
        )
        args = SFTConfig(
            **common,
            max_length=cfg.max_seq_length if cfg.truncation else None,
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
            callbacks=callbacks,
        )
    else:
        if cfg.loss == "dpo":
            from trl import DPOConfig as Config
            from trl import DPOTrainer as Trainer
        else:
            from trl.experimental.orpo import ORPOConfig as Config
            from trl.experimental.orpo import ORPOTrainer as Trainer
        args = Config(
            **common,
            beta=cfg.beta,
            max_length=cfg.max_seq_length if cfg.truncation else None,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=preference_dataset(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )

    base_ref = base_reference(cfg.model, source)
    try:
        result = trainer.train()
    finally:
        events.flush()
        point_adapters_at(base_ref, MODEL_DIR)
    out: dict[str, Any] = {
        "train_loss": result.training_loss,
        "global_step": result.global_step,
    }
    merged = cfg.is_peft and cfg.merge_before_push
    if merged and _prequantized(source.base):
        merged = False
        events.log(
            {
                "type": "warning",
                "message": "merge_before_push skipped: the base model is stored quantized, so a "
                "merged copy would be too; the result is the LoRA adapter",
            },
            now=True,
        )
    final = trainer.model
    if cfg.is_peft:
        if continue_adapter and hasattr(final, "peft_config") and "ref" in final.peft_config:
            final.delete_adapter("ref")  # DPO's frozen copy of the starting adapter
        adapter_dir = MODEL_DIR / "adapter" if merged else MODEL_DIR
        final.save_pretrained(str(adapter_dir))
        tokenizer.save_pretrained(str(adapter_dir))
        out["adapter_dir"] = adapter_dir.as_posix()
        if merged:
            full = _merged(final, engine, source, adapter_dir, dtype)
            full.save_pretrained(str(MODEL_DIR))
            tokenizer.save_pretrained(str(MODEL_DIR))
    else:
        trainer.save_model(str(MODEL_DIR))
        tokenizer.save_pretrained(str(MODEL_DIR))
    point_adapters_at(base_ref, MODEL_DIR)
    out["model_dir"] = MODEL_DIR.as_posix()
    out["kind"] = "adapter" if cfg.is_peft and not merged else "full"
    out["checkpoints"] = sorted(
        (p.name for p in MODEL_DIR.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1])
    )
    return out


def _prequantized(base: str) -> bool:
    """A base stored quantized (e.g. `unsloth/...-bnb-4bit`): its config carries the scheme."""
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(base), "quantization_config", None) is not None
    except Exception:  # unreadable config: the merge itself will say what is wrong
        return False


def _merged(model: Any, engine: Any, source: Any, adapter_dir: Path, dtype: Any) -> Any:
    """The full model with the trained adapter merged in. A 4-bit or unsloth-patched model is
    not merged in place (that would save rounded 4-bit weights, or unsloth's modules): the
    saved adapter goes onto a fresh copy of the base in `dtype`, on the CPU."""
    if engine.name == "transformers" and not engine.load_in_4bit:
        return model.merge_and_unload()
    from openweights.jobs.model_source import LocalModel, load_model

    fresh, _ = load_model(
        LocalModel(name=source.name, base=source.base, adapter=str(adapter_dir)),
        dtype=dtype,
        merge=True,
    )
    return fresh


def push_to_hub(cfg: TrainingConfig, ow: Any) -> None:
    """Mirror uploads/model to the Hugging Face Hub when the org set HF_TOKEN and HF_ORG/HF_USER.
    openweights' storage stays the primary copy: a failed push is reported, not fatal."""
    from openweights.jobs.hub import hub_repo_id, push_folder

    repo = hub_repo_id(cfg.finetuned_model_id)
    if repo is None:
        return
    try:
        url = push_folder(MODEL_DIR, repo, private=cfg.push_to_private)
    except Exception as e:  # the Hub's message says why (auth, quota, network)
        ow.run.log({"type": "hub", "repo": repo, "error": f"{type(e).__name__}: {e}"[:2000]})
        print(f"warning: pushing to the Hub as {repo} failed: {e}", file=sys.stderr, flush=True)
        return
    ow.run.log({"type": "hub", "repo": repo, "url": url})


def main(config_class: type[TrainingConfig] = TrainingConfig, *, weighted: bool = False) -> int:
    from openweights import OpenWeights

    ow = OpenWeights()
    job = ow.jobs.retrieve(os.environ["OPENWEIGHTS_JOB_ID"])
    cfg = config_class(**job.params["validated_params"])
    events = EventBatcher(ow.run)
    UPLOADS.mkdir(exist_ok=True)
    t0 = time.monotonic()
    try:
        out = train(cfg, ow, events, weighted=weighted)
    except (Diverged, DataError, EngineError) as e:
        events.log({"type": "error", "error": str(e)}, now=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        events.flush()
    ow.run.log(
        {
            "type": "result",
            "finetuned_model_id": cfg.finetuned_model_id,
            "train_seconds": round(time.monotonic() - t0, 3),
            **{k: v for k, v in out.items() if k != "checkpoints"},
        }
    )
    push_to_hub(cfg, ow)
    # Last: the server registers the model from this event and the run's uploaded files.
    ow.run.log(
        {
            "type": "model",
            "name": cfg.finetuned_model_id,
            "base_model": cfg.model,
            "prefix": OUTPUT_DIR,
            "kind": out["kind"],
        }
    )
    print(f"fine-tuned {cfg.model} → {cfg.finetuned_model_id}: {json.dumps(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
