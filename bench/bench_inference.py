"""CPU batch inference: the `ow.inference` transformers engine vs plain `generate`, tokens/s.

Three ways to generate the same greedy completions (every one exactly `--new-tokens` long) for the
same chat prompts on the tiny model, in one process, interleaved over `--repeats` rounds:

- `one_at_a_time`: a `generate` call per prompt (the floor batching beats);
- `plain_batched`: `generate` on batches of `--batch` prompts, left padded, in file order;
- `engine`: `TransformersEngine.generate` (what the job runs: sorted by length, batches bounded by
  sequences and tokens, outputs decoded and counted per row).

    python bench/bench_inference.py [--prompts 256] [--new-tokens 32] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import machine, ratio  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument(
        "--loop-prompts", type=int, default=64, help="prompts for the one-at-a-time loop"
    )
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from openweights.jobs.inference.engines import TransformersEngine, render_prompts
    from openweights.jobs.inference.params import InferenceConfig
    from openweights.jobs.model_source import resolve_model
    from openweights.testing import conversations_rows, make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="ow-bench-inference-"))
    model_dir = make_tiny_model(tmp / "tiny")
    rows = [{"messages": r["messages"][:1]} for r in conversations_rows(args.prompts, seed=3)]
    n = args.new_tokens
    cfg = InferenceConfig(
        model=str(model_dir),
        input_file_id="conversations:file-000000000000",
        max_tokens=n,
        min_tokens=n,
        temperature=0,
        max_num_seqs=args.batch,
        max_model_len=512,
    )
    engine = TransformersEngine.load(resolve_model(cfg.model), cfg)
    model, tok = engine.model, engine.tokenizer
    prompts = render_prompts(list(enumerate(rows, 1)), tok, cfg, model_name=cfg.model)
    gen_kwargs = dict(
        max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
    )

    def one_at_a_time() -> int:
        tokens = 0
        for p in prompts[: args.loop_prompts]:
            ids = torch.tensor([p.ids])
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen_kwargs)
            tokens += out.shape[1] - ids.shape[1]
        return tokens

    def plain_batched() -> int:
        tokens = 0
        for i in range(0, len(prompts), args.batch):
            batch = prompts[i : i + args.batch]
            width = max(len(p.ids) for p in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(batch):
                ids[j, width - len(p.ids) :] = torch.tensor(p.ids)
                mask[j, width - len(p.ids) :] = 1
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, **gen_kwargs)
            tokens += (out.shape[1] - width) * len(batch)
        return tokens

    def ours() -> int:
        outs = [o for batch in engine.generate(prompts) for _, o in batch]
        assert len(outs) == len(prompts)
        return sum(o["completion_tokens"] for o in outs)

    series = {"one_at_a_time": one_at_a_time, "plain_batched": plain_batched, "engine": ours}
    rates: dict[str, list[float]] = {k: [] for k in series}
    ours()  # warm-up
    for _ in range(args.repeats):
        for name, fn in series.items():
            t0 = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - t0))

    results: dict = {
        "machine": machine(),
        "settings": {
            "prompts": args.prompts,
            "loop_prompts": args.loop_prompts,
            "new_tokens": n,
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": args.threads,
            "mean_prompt_tokens": round(statistics.fmean(len(p.ids) for p in prompts), 1),
        },
    }
    for name, values in rates.items():
        results[name] = {
            "tokens_per_s_median": round(statistics.median(values), 1),
            "tokens_per_s_max": round(max(values), 1),
            "runs": [round(v, 1) for v in values],
        }
    med = {k: results[k]["tokens_per_s_median"] for k in rates}
    results["engine_vs_plain_batched"] = ratio(med["engine"], med["plain_batched"])
    # rounds are interleaved: the ratio within a round is steadier on a shared, noisy machine
    paired = [e / b for e, b in zip(rates["engine"], rates["plain_batched"], strict=True)]
    results["engine_vs_plain_batched_paired_median"] = round(statistics.median(paired), 3)
    results["engine_vs_one_at_a_time"] = ratio(med["engine"], med["one_at_a_time"])
    results["plain_batched_vs_one_at_a_time"] = ratio(med["plain_batched"], med["one_at_a_time"])

    print("| way | tokens/s (median) | max | × one at a time |")
    print("|---|---:|---:|---:|")
    for name in rates:
        r = results[name]
        print(
            f"| {name} | {r['tokens_per_s_median']:.0f} | {r['tokens_per_s_max']:.0f} | "
            f"{ratio(med[name], med['one_at_a_time'])} |"
        )
    print(
        f"engine / plain batched: {results['engine_vs_plain_batched']} (medians), "
        f"{results['engine_vs_plain_batched_paired_median']} (median of per-round ratios)"
    )
    out = Path(__file__).parent / "results" / "inference.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
