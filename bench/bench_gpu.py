"""GPU measurements for a lent machine, one step per call (bench/gpu_check.sh runs them in order,
each under its own timeout). Every step writes one JSON file and, where a dependency is missing,
a JSON with `"skipped": "<reason>"` instead of failing.

    python bench/bench_gpu.py probe OUT.json
    python bench/bench_gpu.py models DIR                  # tiny + small model, LoRA, data
    python bench/bench_gpu.py train DIR OUT.json --engine transformers|unsloth [--4bit] [--cpu-dry-run]
    python bench/bench_gpu.py vllm DIR OUT.json [--lora]
    python bench/bench_gpu.py summary OUT_DIR           # → OUT_DIR/gpu_check.json

The "small" model is Qwen2.5-0.5B-shaped (24 layers, hidden 896, 14/2 heads) with random
weights and the tiny model's 512-token vocabulary: throughput depends on shapes, not on what
the weights learned, and nothing has to be downloaded (the GPU machine has no network).
`BENCH_MODEL=/path` (a local model directory) replaces it.

Training goes through the fine-tuning job's own `train()` (the code a job runs), in this
process, with local files; tokens/s counts input tokens (`num_input_tokens_seen`) over the
steps after the first `WARMUP_STEPS` (unsloth compiles on its first steps); the whole-run
average is reported too. Peak memory is `torch.cuda.max_memory_allocated()`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 5
TRAIN_STEPS = 30
TRAIN_BATCH = 8
SEQ_TOKENS = 512
VLLM_PROMPTS = 256
VLLM_NEW_TOKENS = 128
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm", "unsloth",
            "unsloth_zoo", "bitsandbytes", "pytest", "fastapi", "httpx")  # fmt: skip


def write(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str))
    print(json.dumps(data, default=str), flush=True)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- probe


def probe(out: str) -> None:
    """What is installed and what the GPU is; imports only torch (never unsloth or vLLM)."""
    data: dict = {"python": platform.python_version(), "packages": {}}
    for name in PACKAGES:
        data["packages"][name] = (
            _version(name) if importlib.util.find_spec(name) is not None else None
        )
    try:
        import torch

        data["torch_cuda"] = torch.version.cuda
        data["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            data["gpu"] = torch.cuda.get_device_name(0)
            data["gpu_memory_gb"] = round(
                torch.cuda.get_device_properties(0).total_memory / 2**30, 1
            )
            data["bf16"] = torch.cuda.is_bf16_supported()
    except Exception as e:  # a broken torch install is a finding too
        data["torch_error"] = f"{type(e).__name__}: {e}"
    write(out, data)


# ---------------------------------------------------------------- models and data


def _long_rows(n: int, words: int, seed: int = 0) -> list[dict]:
    """Chats of about SEQ_TOKENS tokens from the tiny tokenizer's own words."""
    import random

    from openweights.testing import conversations_rows

    vocab = sorted(
        {w for r in conversations_rows(64) for m in r["messages"] for w in m["content"].split()}
    )
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(vocab) for _ in range(words // 4))
        a = " ".join(rng.choice(vocab) for _ in range(words - words // 4))
        rows.append(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
    return rows


def models(root: str) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from openweights.testing import make_tiny_model, write_jsonl

    d = Path(root)
    d.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_model(d / "tiny")
    small = d / "small"
    params_m = None
    if os.environ.get("BENCH_MODEL"):
        small = Path(os.environ["BENCH_MODEL"])
    elif not (small / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(tiny)
        base = json.loads((tiny / "config.json").read_text())
        config = Qwen2Config(
            vocab_size=base["vocab_size"],
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=base["eos_token_id"],
            pad_token_id=base["pad_token_id"],
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        model.save_pretrained(small)
        del model
        tok.save_pretrained(small)
    # a LoRA adapter of rank 16 on every projection, as a fine-tune makes by default
    adapter = d / "small-lora"
    if not (adapter / "adapter_config.json").exists():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from openweights.jobs.fine_tuning.params import DEFAULT_TARGET_MODULES

        m = AutoModelForCausalLM.from_pretrained(small, dtype=torch.bfloat16)
        cfg = LoraConfig(
            r=16, lora_alpha=16, target_modules=DEFAULT_TARGET_MODULES, init_lora_weights=False
        )
        get_peft_model(m, cfg).save_pretrained(adapter)
    tok = AutoTokenizer.from_pretrained(small)
    rows = _long_rows(TRAIN_BATCH * TRAIN_STEPS, words=SEQ_TOKENS // 4)
    n_tokens = [
        len(tok(tok.apply_chat_template(r["messages"], tokenize=False))["input_ids"])
        for r in rows[:8]
    ]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(
        d / "prompts.jsonl",
        [{"messages": r["messages"][:1]} for r in _long_rows(VLLM_PROMPTS, 64, seed=1)],
    )
    write(d / "models.json", {
        "tiny": str(tiny), "small": str(small), "adapter": str(adapter),
        "params_m": params_m,
        "row_tokens_sample": n_tokens,
    })  # fmt: skip


# ---------------------------------------------------------------- training


class Events:
    """Stands in for the job's EventBatcher: keeps each event with the time it was logged."""

    def __init__(self) -> None:
        self.events: list[tuple[float, dict]] = []

    def log(self, data: dict, *, now: bool = False) -> None:
        self.events.append((time.perf_counter(), dict(data)))

    def log_many(self, events: list[dict]) -> None:
        for e in events:
            self.log(e)

    def flush(self) -> None:
        pass


def train(root: str, out: str, engine: str, four_bit: bool, cpu_dry_run: bool = False) -> None:
    """`cpu_dry_run`: the tiny model, a few steps, on CPU: checks this code, measures nothing."""
    from openweights.jobs.fine_tuning._engine import is_bitsandbytes_available, is_unsloth_available

    name = f"{engine}{'-4bit' if four_bit else ''}"
    if engine == "unsloth" and not is_unsloth_available():
        return write(
            out, {"run": name, "skipped": 'unsloth is not installed ("openweights[unsloth]")'}
        )
    if four_bit and not is_bitsandbytes_available():
        return write(
            out, {"run": name, "skipped": 'bitsandbytes is not installed ("openweights[bnb]")'}
        )
    import torch

    if not torch.cuda.is_available() and not cpu_dry_run:
        return write(out, {"run": name, "skipped": "no CUDA GPU"})
    from openweights.jobs.fine_tuning import entry
    from openweights.jobs.fine_tuning.params import TrainingConfig

    d = Path(root).resolve()
    info = json.loads((d / "models.json").read_text())
    work = d / f"train-{name}"
    work.mkdir(exist_ok=True)
    os.chdir(work)  # the job writes uploads/ under its working directory
    steps, batch = (WARMUP_STEPS + 3, 2) if cpu_dry_run else (TRAIN_STEPS, TRAIN_BATCH)
    cfg = TrainingConfig(
        model=info["tiny"] if cpu_dry_run else info["small"],
        training_file=str(d / "train.jsonl"),
        loss="sft",
        use_unsloth=engine == "unsloth",
        load_in_4bit=four_bit,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_seq_length=SEQ_TOKENS,
        learning_rate=1e-4,
        warmup_steps=0,
        optim="adamw_torch",
        save_steps=10**6,
        merge_before_push=False,
        eval_every_n_steps=10**6,
    )
    events = Events()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = entry.train(cfg, None, events)
    wall = time.perf_counter() - t0
    progress = [(t, e) for t, e in events.events if e.get("type") == "progress"]
    engine_event = next(e for _, e in events.events if e.get("type") == "engine")
    data = {
        "run": name,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_dry_run": cpu_dry_run,
        "engine": engine_event,
        "steps": result["global_step"],
        "batch": batch,
        "max_seq_length": SEQ_TOKENS,
        "train_loss": result["train_loss"],
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3)
        if cuda
        else None,
        "train_wall_s": round(wall, 2),
    }
    seen = [
        (t, e.get("num_input_tokens_seen")) for t, e in progress if e.get("num_input_tokens_seen")
    ]
    if len(seen) > WARMUP_STEPS + 1:
        (t_a, n_a), (t_b, n_b) = seen[WARMUP_STEPS - 1], seen[-1]
        data["tokens_per_s_after_warmup"] = round((n_b - n_a) / (t_b - t_a), 1)
        data["tokens"] = n_b
    if progress:
        data["tokens_per_s_whole_run"] = round(progress[-1][1].get("tokens_per_s", 0), 1)
    write(out, data)


# ---------------------------------------------------------------- vLLM


def vllm(root: str, out: str, lora: bool) -> None:
    name = "vllm-lora" if lora else "vllm-base"
    if importlib.util.find_spec("vllm") is None:
        return write(out, {"run": name, "skipped": 'vLLM is not installed ("openweights[vllm]")'})
    import torch

    if not torch.cuda.is_available():
        return write(out, {"run": name, "skipped": "no CUDA GPU"})
    from openweights.jobs.inference.engines import VllmEngine, render_prompts
    from openweights.jobs.inference.params import InferenceConfig
    from openweights.jobs.model_source import resolve_model

    d = Path(root).resolve()
    info = json.loads((d / "models.json").read_text())
    model = info["adapter"] if lora else info["small"]
    cfg = InferenceConfig(
        model=model,
        input_file_id="conversations:file-000000000000",
        max_tokens=VLLM_NEW_TOKENS,
        min_tokens=VLLM_NEW_TOKENS,  # every completion has the same length
        temperature=0,
        max_model_len=1024,
        seed=0,
    )
    t0 = time.perf_counter()
    engine = VllmEngine.load(resolve_model(model), cfg, n_gpus=1)
    load_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in (d / "prompts.jsonl").read_text().splitlines()]
    prompts = render_prompts(
        list(enumerate(rows, start=1)), engine.tokenizer, cfg, model_name=model
    )
    list(engine.generate(prompts[:8]))  # warm-up
    t0 = time.perf_counter()
    outs = [o for batch in engine.generate(prompts) for _, o in batch]
    gen_s = time.perf_counter() - t0
    new = sum(o["completion_tokens"] for o in outs)
    write(out, {
        "run": name, "gpu": torch.cuda.get_device_name(0), "model": model,
        "prompts": len(prompts), "new_tokens": new, "prompt_tokens": sum(len(p.ids) for p in prompts),
        "generate_s": round(gen_s, 3), "output_tokens_per_s": round(new / gen_s, 1),
        "engine_load_s": round(load_s, 1), "vllm": _version("vllm"),
    })  # fmt: skip


# ---------------------------------------------------------------- summary


def summary(out_dir: str) -> None:
    """All step results in one `gpu_check.json`, and one line per measurement."""
    d = Path(out_dir)
    results = {
        f.stem: json.loads(f.read_text())
        for f in sorted(d.glob("*.json"))
        if f.name not in ("gpu_check.json", "models.json")
    }
    steps = [json.loads(line) for line in (d / "steps.jsonl").read_text().splitlines() if line]
    data = {"steps": steps, "results": results}
    (d / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str))
    print("=== summary")
    for s in steps:
        print(f"  {s['step']:<26} {s['status']:<8} {s['seconds']:>4}s {s.get('reason') or ''}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"  {name:<26} skipped: {r['skipped']}")
        elif name.startswith("train-"):
            print(
                f"  {name:<26} {r.get('tokens_per_s_after_warmup')} tok/s after warm-up "
                f"({r.get('tokens_per_s_whole_run')} whole run), peak "
                f"{r['peak_gpu_memory_gb']} GiB, dtype {r['engine']['dtype']}"
            )
        elif name.startswith("vllm-"):
            print(f"  {name:<26} {r['output_tokens_per_s']} output tok/s ({r['prompts']} prompts)")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe").add_argument("out")
    sub.add_parser("models").add_argument("dir")
    t = sub.add_parser("train")
    t.add_argument("dir")
    t.add_argument("out")
    t.add_argument("--engine", choices=["transformers", "unsloth"], default="transformers")
    t.add_argument("--4bit", dest="four_bit", action="store_true")
    t.add_argument("--cpu-dry-run", action="store_true", help="tiny model, a few steps, on CPU")
    v = sub.add_parser("vllm")
    v.add_argument("dir")
    v.add_argument("out")
    v.add_argument("--lora", action="store_true")
    sub.add_parser("summary").add_argument("dir")
    a = p.parse_args()
    if a.cmd == "probe":
        probe(a.out)
    elif a.cmd == "models":
        models(a.dir)
    elif a.cmd == "summary":
        summary(a.dir)
    elif a.cmd == "train":
        train(a.dir, a.out, a.engine, a.four_bit, a.cpu_dry_run)
    else:
        vllm(a.dir, a.out, a.lora)


if __name__ == "__main__":
    main()
