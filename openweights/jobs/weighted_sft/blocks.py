"""Block-formatted conversations → token ids with one loss weight per token (worker side).

The conversation is rendered once with the tokenizer's chat template and tokenized once with
an offsets mapping; each token takes the weight of the content block its first character is in
(a token that straddles two blocks takes the first one's). Tokens the template adds (role
headers, separators) get weight 0, except the end-of-turn token right after an assistant
message (e.g. `<|im_end|>`), which takes the weight of that message's last block: it is what
teaches the model to stop.

Where each message's content lands in the rendered text is found by rendering the template a
second time with a placeholder per message; if the template rewrites content (strips it, say),
each block is searched for in order instead, and a block that cannot be found is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Block", "Tokenized", "default_weight", "normalize_messages", "tokenize_conversation"]


@dataclass
class Block:
    message: int  # index of the message in the row
    index: int  # index of the block in its message
    role: str
    text: str
    weight: float
    tag: str | None
    start: int = -1  # character span in the rendered text; -1 when the template dropped it
    end: int = -1
    tokens: list[int] = field(default_factory=list)  # token positions in this block


@dataclass
class Tokenized:
    text: str  # the chat-templated text
    input_ids: list[int]
    weights: list[float]  # loss weight of predicting token t (weights[0] is never used)
    block_of: list[int]  # per token: index into `blocks`, -1 for template tokens
    assistant: list[bool]  # per token: content or end-of-turn of an assistant message
    blocks: list[Block]

    def __len__(self) -> int:
        return len(self.input_ids)


def default_weight(role: str, responses_only: bool = True) -> float:
    """Weight of a string content or a block without `weight`: 1 for assistant turns; other
    roles 0 when training on responses only, else 1."""
    return 1.0 if role == "assistant" or not responses_only else 0.0


def normalize_messages(
    messages: list[dict[str, Any]], weight_of: Callable[[str], float] = default_weight
) -> list[Block]:
    blocks = []
    for i, m in enumerate(messages):
        content = m.get("content")
        items = [{"text": content}] if isinstance(content, str) else (content or [])
        for j, b in enumerate(items):
            w = b.get("weight")
            blocks.append(
                Block(
                    message=i,
                    index=j,
                    role=m["role"],
                    text=b.get("text", ""),
                    weight=float(weight_of(m["role"]) if w is None else w),
                    tag=b.get("tag"),
                )
            )
    return blocks


def plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Block content joined into strings: what the chat template renders."""
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            c = "".join(b.get("text", "") for b in c)
        out.append({"role": m["role"], "content": c if c is not None else ""})
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


_PH = "\ue000{}\ue001"


def _locate(tokenizer: Any, messages: list[dict[str, Any]], blocks: list[Block], text: str) -> None:
    """Set each block's character span in `text` (the rendered conversation)."""
    plain = plain_messages(messages)
    try:
        ph = _render(
            tokenizer, [{"role": m["role"], "content": _PH.format(i)} for i, m in enumerate(plain)]
        )
    except Exception:  # a template that inspects content: fall back to searching
        ph = None
    starts: dict[int, int] = {}
    if ph is not None:
        rebuilt, pos, offset = [], 0, 0
        for i, m in enumerate(plain):
            marker = _PH.format(i)
            at = ph.find(marker, pos)
            if at < 0:
                continue  # the template drops this message
            rebuilt.append(ph[pos:at])
            offset += at - pos
            starts[i] = offset
            rebuilt.append(m["content"])
            offset += len(m["content"])
            pos = at + len(marker)
        rebuilt.append(ph[pos:])
        if "".join(rebuilt) == text:
            cursor: dict[int, int] = dict(starts)
            for b in blocks:
                if b.message in cursor:
                    b.start = cursor[b.message]
                    b.end = b.start + len(b.text)
                    cursor[b.message] = b.end
            return
    # The template rewrites content: find each block's text, in order.
    cursor_pos = 0
    for b in blocks:
        if not b.text:
            b.start = b.end = cursor_pos
            continue
        at = text.find(b.text, cursor_pos)
        needle = b.text
        if at < 0 and b.text.strip():
            needle = b.text.strip()
            at = text.find(needle, cursor_pos)
        if at < 0:
            raise ValueError(
                f"messages[{b.message}].content[{b.index}]: the chat template does not render "
                f"this block's text verbatim ({b.text[:40]!r}), so its tokens cannot be weighted"
            )
        b.start, b.end = at, at + len(needle)
        cursor_pos = b.end


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    weight_of: Callable[[str], float] = default_weight,
) -> Tokenized:
    """Render `messages` with the chat template and give every token its block's weight."""
    blocks = normalize_messages(messages, weight_of)
    text = _render(tokenizer, plain_messages(messages))
    _locate(tokenizer, messages, blocks, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    n = len(ids)
    weights = [0.0] * n
    block_of = [-1] * n
    assistant = [False] * n
    spans = sorted(
        ((b.start, b.end, k) for k, b in enumerate(blocks) if b.end > b.start), key=lambda s: s[0]
    )
    si = 0
    for t, (a, e) in enumerate(offsets):
        if e <= a:
            continue
        while si < len(spans) and spans[si][1] <= a:
            si += 1
        if si < len(spans) and spans[si][0] <= a < spans[si][1]:
            k = spans[si][2]
            block_of[t] = k
            weights[t] = blocks[k].weight
            assistant[t] = blocks[k].role == "assistant"
            blocks[k].tokens.append(t)
    # The end-of-turn token after each assistant message trains like its last block.
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    eos = tokenizer.eos_token_id
    last_block: dict[int, int] = {}
    for k, b in enumerate(blocks):
        if b.role == "assistant" and b.end >= 0:
            last_block[b.message] = k
    for k in last_block.values():
        end = blocks[k].end
        for t, (a, _e) in enumerate(offsets):
            if a >= end:
                if block_of[t] == -1 and (ids[t] == eos or ids[t] in specials):
                    block_of[t] = k
                    weights[t] = blocks[k].weight
                    assistant[t] = True
                    blocks[k].tokens.append(t)
                break
    return Tokenized(text, ids, weights, block_of, assistant, blocks)
