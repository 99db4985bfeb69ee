"""Small datasets in every openweights file format, made deterministically."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

_WORDS = (
    "apple river stone cloud green seven quiet lamp orange paper window music bright north".split()
)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def conversations_rows(n: int = 32, *, seed: int = 0) -> list[dict]:
    """Chats where the answer repeats the question's first word in tags: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = _sentence(rng, 4)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": f"<response>{q.split()[0]}</response>"},
                ]
            }
        )
    return rows


def preference_rows(n: int = 32, *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = _sentence(rng, 4)
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [
                    {"role": "assistant", "content": f"<response>{q.split()[0]}</response>"}
                ],
                "rejected": [{"role": "assistant", "content": _sentence(rng, 3)}],
            }
        )
    return rows


def weighted_rows(n: int = 16, *, seed: int = 0) -> list[dict]:
    """Block-formatted chats with per-block `weight` and `tag`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = _sentence(rng, 4)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": q, "weight": 0}]},
                    {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "text",
                                "text": _sentence(rng, 2),
                                "weight": -1,
                                "tag": "minimize",
                            },
                            {
                                "type": "text",
                                "text": f" <response>{q.split()[0]}</response>",
                                "weight": 1,
                                "tag": "maximize",
                            },
                        ],
                    },
                ]
            }
        )
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
