"""Per-token, per-block, per-tag and per-row log-probabilities of conversations under a model.

Shared by the `logprob` job and the `logp_callback_datasets` of training jobs (worker side).
A token's log-probability is `log p(token | everything before it)`. A row's mean is over the
tokens of its assistant messages (content and end-of-turn); a row without assistant messages
is scored over all its content. A tag's value is over the tokens of the blocks with that tag.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from openweights.jobs.weighted_sft.blocks import Tokenized, tokenize_conversation

__all__ = ["score_rows", "summarize"]


def _stats(values: list[float]) -> dict[str, float | int]:
    n = len(values)
    s = float(sum(values))
    return {"mean": s / n if n else float("nan"), "sum": s, "n_tokens": n}


def score_rows(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    with_tokens: bool = True,
) -> list[dict[str, Any]]:
    """Score conversations rows; returns one result dict per row (see `annotate`)."""
    import torch

    tokenized = [tokenize_conversation(tokenizer, r["messages"]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    token_logps: list[list[float]] = []
    try:
        with torch.no_grad():
            for i in range(0, len(tokenized), batch_size):
                batch = tokenized[i : i + batch_size]
                seqs = [t.input_ids[:max_length] if max_length else t.input_ids for t in batch]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for b, s in enumerate(seqs):
                    ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
                    mask[b, : len(s)] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
                for b, s in enumerate(seqs):
                    # position 0 has no context: no log-probability
                    token_logps.append([float("nan")] + picked[b, : len(s) - 1].tolist())
    finally:
        if was_training:
            model.train()
    return [
        annotate(tokenizer, row, tok, lps, with_tokens=with_tokens)
        for row, tok, lps in zip(rows, tokenized, token_logps, strict=True)
    ]


def annotate(
    tokenizer: Any, row: dict, tok: Tokenized, lps: list[float], *, with_tokens: bool = True
) -> dict[str, Any]:
    """`{"logp": row mean, "tags": {tag: stats}, "blocks": [[stats per block] per message],
    "tokens": [...]}` for one row (tokens past a truncation are not scored)."""
    n = len(lps)
    scored = [t for t in range(1, n) if tok.assistant[t]]
    if not scored:
        scored = [t for t in range(1, n) if tok.block_of[t] >= 0]
    row_stats = _stats([lps[t] for t in scored])
    by_tag: dict[str, list[float]] = defaultdict(list)
    blocks: list[list[dict]] = [[] for _ in row["messages"]]
    for b in tok.blocks:
        values = [lps[t] for t in b.tokens if 0 < t < n]
        if b.tag:
            by_tag[b.tag].extend(values)
        blocks[b.message].append(
            {k: v for k, v in _stats(values).items()} | {"weight": b.weight, "tag": b.tag}
        )
    out: dict[str, Any] = {
        "logp": row_stats["mean"],
        "logp_sum": row_stats["sum"],
        "n_tokens": row_stats["n_tokens"],
        "tags": {tag: _stats(v) for tag, v in by_tag.items()},
        "blocks": blocks,
    }
    if with_tokens:
        out["tokens"] = [
            {
                "token_id": tok.input_ids[t],
                "token": tokenizer.decode([tok.input_ids[t]]),
                "logp": None if math.isnan(lps[t]) else lps[t],
                "block": (
                    [tok.blocks[tok.block_of[t]].message, tok.blocks[tok.block_of[t]].index]
                    if tok.block_of[t] >= 0
                    else None
                ),
            }
            for t in range(n)
        ]
    return out


def output_row(row: dict, result: dict) -> dict:
    """The input row with each block-formatted message's blocks annotated (`logprob`: their
    tokens' summed log-probability, `logprob_mean`, `n_tokens`) and a `logprobs` summary."""
    out = dict(row)
    messages = []
    for m, stats in zip(row["messages"], result["blocks"], strict=True):
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = [
                {
                    **blk,
                    "logprob": s["sum"],
                    "logprob_mean": _finite(s["mean"]),
                    "n_tokens": s["n_tokens"],
                }
                for blk, s in zip(m["content"], stats, strict=True)
            ]
        messages.append(m)
    out["messages"] = messages
    out["logprobs"] = {
        "mean": _finite(result["logp"]),
        "sum": result["logp_sum"],
        "n_tokens": result["n_tokens"],
        "tags": {t: {**s, "mean": _finite(s["mean"])} for t, s in result["tags"].items()},
        **({"tokens": result["tokens"]} if "tokens" in result else {}),
    }
    return out


def _tag(name: str, tag: str) -> str:
    return f"{name}/{tag}" if name else tag


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def summarize(name: str, results: list[dict], step: int | None = None) -> list[dict]:
    """Events: one per row (`tag` = `name`) and one per row and block tag (`tag` =
    `name/tag`, or the block tag when `name` is empty), each with `logp` (mean token log-probability) and `n_tokens`; plus, per tag,
    the mean over rows (`type: logp_mean`)."""
    base: dict[str, Any] = {"dataset": name}
    if step is not None:
        base["step"] = step
    events = []
    per_tag: dict[str, list[float]] = defaultdict(list)
    for i, r in enumerate(results):
        if r["n_tokens"]:
            events.append(
                {
                    "type": "logp",
                    **base,
                    "tag": name,
                    "row": i,
                    "logp": r["logp"],
                    "n_tokens": r["n_tokens"],
                }
            )
            per_tag[name].append(r["logp"])
        for tag, s in r["tags"].items():
            if s["n_tokens"]:
                events.append(
                    {
                        "type": "logp",
                        **base,
                        "tag": _tag(name, tag),
                        "block_tag": tag,
                        "row": i,
                        "logp": s["mean"],
                        "n_tokens": s["n_tokens"],
                    }
                )
                per_tag[_tag(name, tag)].append(s["mean"])
    for tag, values in per_tag.items():
        events.append(
            {"type": "logp_mean", **base, "tag": tag, "logp_mean": sum(values) / len(values)}
        )
    return events
