"""Worker side of `ow.logprob`: `python -m openweights.jobs.logprob.entry`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from openweights.jobs.logprob import LogProbConfig

RESULT = Path("logprobs.jsonl")


def main() -> int:
    import torch

    from openweights import OpenWeights
    from openweights.jobs.fine_tuning.callbacks import EventBatcher
    from openweights.jobs.fine_tuning.entry import load_rows
    from openweights.jobs.logprob.scoring import output_row, score_rows, summarize
    from openweights.jobs.model_source import load_model, resolve_model

    ow = OpenWeights()
    job = ow.jobs.retrieve(os.environ["OPENWEIGHTS_JOB_ID"])
    cfg = LogProbConfig(**job.params["validated_params"])
    events = EventBatcher(ow.run)
    rows, name = load_rows(ow, cfg.dataset)
    for row in rows:
        if "messages" not in row:
            print(
                f"error: {name} line {row['__line__']}, field messages: required; "
                "a row to score is a conversation",
                file=sys.stderr,
            )
            return 1
    rows = [{k: v for k, v in r.items() if k != "__line__"} for r in rows]
    cuda = torch.cuda.is_available()
    source = resolve_model(cfg.model, ow=ow)
    model, tokenizer = load_model(source, device="cuda" if cuda else None)
    if cfg.chat_template != "default":
        tokenizer.chat_template = cfg.chat_template
    events.log(
        {
            "type": "engine",
            "device": "cuda" if cuda else "cpu",
            "dtype": str(model.dtype).removeprefix("torch."),
            "base": source.base,
            "adapter": source.adapter,
        },
        now=True,
    )
    results = score_rows(
        model,
        tokenizer,
        rows,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        with_tokens=cfg.with_tokens,
    )
    with open(RESULT, "w") as f:
        for row, res in zip(rows, results, strict=True):
            f.write(json.dumps(output_row(row, res)) + "\n")
    file_id = ow.files.upload(RESULT, purpose="result").id
    events.log_many(summarize("", results))
    events.flush()
    scored = [r["logp"] for r in results if r["n_tokens"]]
    ow.run.log(
        {
            "type": "logprobs",
            "file": file_id,
            "path": RESULT.name,
            "rows": len(rows),
            "mean_logp": sum(scored) / len(scored) if scored else None,
        }
    )
    print(f"scored {len(rows)} rows of {name} under {cfg.model}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
