"""Inference engines: batched transformers `generate` (CPU, or CUDA without vLLM) and vLLM (CUDA).

Both take the same `Prompt`s (token ids rendered once with the model's chat template, so the two
engines see identical prompts) and return one output dict per prompt:
`completion`, `finish_reason`, `prompt_tokens`, `completion_tokens` (lists when
`n_completions_per_prompt > 1`) and `logprobs` when asked for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openweights._exceptions import OpenWeightsError
from openweights.jobs.inference.params import InferenceConfig

__all__ = [
    "InferenceError",
    "Prompt",
    "TransformersEngine",
    "VllmEngine",
    "is_vllm_available",
    "load_tokenizer",
    "render_prompts",
]

#: CPU batches hold at most this many tokens (prompt + new, all sequences): bounds the KV cache.
CPU_MAX_BATCH_TOKENS = 32_768
#: vLLM schedules its own batches; we hand it this many prompts per call so finished rows can
#: be saved between calls.
VLLM_CHUNK_ROWS = 1024
#: vLLM's supported LoRA ranks; an adapter's rank is rounded up to the next one.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class InferenceError(OpenWeightsError):
    """An inference job cannot go on: bad model, bad rows, missing engine. The message says which."""


@dataclass
class Prompt:
    """One input row, rendered: `index` is its position among the file's rows."""

    index: int
    line: int
    ids: list[int]


def is_vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def load_tokenizer(base: str, adapter: str | None, chat_template: str = "default") -> Any:
    from transformers import AutoTokenizer

    source = adapter if adapter and Path(adapter, "tokenizer_config.json").exists() else base
    tokenizer = AutoTokenizer.from_pretrained(source)
    if chat_template != "default":
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _plain(messages: list[dict]) -> list[dict]:
    """Block-formatted content → plain strings."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(b.get("text", "") for b in content)
        out.append({"role": m["role"], "content": content})
    return out


def render_prompts(
    rows: list[tuple[int, dict]], tokenizer: Any, cfg: InferenceConfig, *, model_name: str
) -> list[Prompt]:
    """Rows (with their line numbers) → token ids. A conversation ending with an assistant
    message is continued (`continue_final_message`); otherwise the answer starts with `prefill`."""
    prompts = []
    for index, (line, row) in enumerate(rows):
        if "messages" in row:
            if not tokenizer.chat_template:
                raise InferenceError(
                    f"line {line}: model {model_name!r} has no chat template for `messages` rows; "
                    "pass chat_template=... or use `text` rows"
                )
            messages = _plain(row["messages"])
            if messages[-1]["role"] != "assistant" and cfg.prefill:
                messages.append({"role": "assistant", "content": cfg.prefill})
            cont = messages[-1]["role"] == "assistant"
            text = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=not cont,
                continue_final_message=cont,
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(row["text"])["input_ids"]
        if len(ids) >= cfg.max_model_len:
            raise InferenceError(
                f"line {line}: the prompt is {len(ids)} tokens; max_model_len={cfg.max_model_len} "
                "leaves no room for a completion. Raise max_model_len or shorten the prompt."
            )
        prompts.append(Prompt(index=index, line=line, ids=ids))
    return prompts


def _pack(seqs: list[Any]) -> Any:
    """One output per prompt: a value for n=1, a list of n values otherwise."""
    return seqs[0] if len(seqs) == 1 else seqs


def _combine(per_seq: list[dict]) -> dict:
    out = {
        "completion": _pack([s["completion"] for s in per_seq]),
        "finish_reason": _pack([s["finish_reason"] for s in per_seq]),
        "prompt_tokens": per_seq[0]["prompt_tokens"],
        "completion_tokens": _pack([s["completion_tokens"] for s in per_seq]),
    }
    if "logprobs" in per_seq[0]:
        out["logprobs"] = _pack([s["logprobs"] for s in per_seq])
    return out


# ------------------------------------------------------------------ batched transformers


class _StopStrings:
    """A `StoppingCriteria`: per sequence, stop once a stop string appears after `min_tokens`."""

    def __init__(self, tokenizer: Any, stop: list[str], prompt_len: int, min_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_len = prompt_len
        self.min_tokens = min_tokens
        # a token decodes to at least one character (or a piece of one): this window sees any stop
        self.window = max(len(s) for s in stop) + 4

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        n_new = input_ids.shape[1] - self.prompt_len
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if n_new < max(self.min_tokens, 1):
            return done
        first = max(0, n_new - self.window)
        gen = input_ids[:, self.prompt_len + first :]
        tails = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
        heads = (
            self.tokenizer.batch_decode(gen[:, : self.min_tokens - first], skip_special_tokens=True)
            if self.min_tokens > first
            else [""] * len(tails)
        )
        for i, tail in enumerate(tails):
            # the same rule as the final cut: a stop string counts when it ends after min_tokens
            if _first_stop(tail, self.stop, len(heads[i])) is not None:
                done[i] = True
        return done


class TransformersEngine:
    """Batched `generate`: left padding, prompts sorted by length, batches bounded by sequences
    (`max_num_seqs`) and tokens (`CPU_MAX_BATCH_TOKENS`)."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, cfg: InferenceConfig, *, device: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.pad_id = tokenizer.pad_token_id
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted(e for e in eos if e is not None)
        self.max_batch_tokens = CPU_MAX_BATCH_TOKENS

    @classmethod
    def load(cls, local: Any, cfg: InferenceConfig) -> TransformersEngine:
        import torch

        from openweights.jobs.model_source import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, _ = load_model(local, device=device, merge=bool(local.adapter))
        tokenizer = load_tokenizer(local.base, local.adapter, cfg.chat_template)
        return cls(model, tokenizer, cfg, device=device)

    def _max_new(self, prompt_len: int) -> int:
        return min(self.cfg.max_tokens, self.cfg.max_model_len - prompt_len)

    def batches(self, prompts: list[Prompt]) -> Iterator[list[Prompt]]:
        """Longest first (an out-of-memory shows at once), each batch within both bounds."""
        n = self.cfg.n_completions_per_prompt
        batch: list[Prompt] = []
        for p in sorted(prompts, key=lambda p: len(p.ids), reverse=True):
            longest = len(batch[0].ids) if batch else len(p.ids)
            shortest = len(p.ids)
            seqs = (len(batch) + 1) * n
            tokens = seqs * (longest + self._max_new(shortest))
            if batch and (seqs > self.cfg.max_num_seqs or tokens > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(p)
        if batch:
            yield batch

    def generate(self, prompts: list[Prompt]) -> Iterator[list[tuple[Prompt, dict]]]:
        """One list of (prompt, output) per batch, as each batch finishes."""
        for batch in self.batches(prompts):
            yield list(zip(batch, self.generate_batch(batch), strict=False))

    def generate_batch(self, batch: list[Prompt]) -> list[dict]:
        import torch

        cfg = self.cfg
        n = cfg.n_completions_per_prompt
        seq_prompts = [p for p in batch for _ in range(n)]
        width = max(len(p.ids) for p in batch)
        input_ids = torch.full((len(seq_prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, p in enumerate(seq_prompts):
            input_ids[i, width - len(p.ids) :] = torch.tensor(p.ids)
            mask[i, width - len(p.ids) :] = 1
        max_new = max(self._max_new(len(p.ids)) for p in batch)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_ids,
            "return_dict_in_generate": True,
            "output_logits": cfg.logprobs is not None,
        }
        if cfg.min_tokens > 0:
            kwargs["min_new_tokens"] = min(cfg.min_tokens, max_new)
        if cfg.temperature > 0:
            kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if cfg.stop:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_StopStrings(self.tokenizer, cfg.stop, width, cfg.min_tokens)]
            )
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed * 1_000_003 + min(p.index for p in batch))
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            )
        new = out.sequences[:, width:].cpu()
        logps = None
        if cfg.logprobs is not None:
            logps = torch.stack(out.logits, dim=1).float().log_softmax(-1).cpu()
        seqs = [
            self._finish(p, new[i], logps[i] if logps is not None else None)
            for i, p in enumerate(seq_prompts)
        ]
        return [_combine(seqs[j * n : (j + 1) * n]) for j in range(len(batch))]

    def _finish(self, prompt: Prompt, tokens: Any, logps: Any) -> dict:
        """One sequence: cut at EOS, the row's own length cap and the first stop string."""
        cfg = self.cfg
        ids = tokens.tolist()
        cap = self._max_new(len(prompt.ids))
        reason = "length"
        count = min(len(ids), cap)
        for j, t in enumerate(ids[:count]):
            if t in self.eos_ids:
                count, reason = j + 1, "stop"
                break
        else:
            # a sequence a stop string ended is padded to the batch's length; the cut below
            # finds the stop string itself. Without stop strings nothing pads a sequence that
            # has no EOS, and a pad token the model sampled is part of its answer (trimming it
            # made min_tokens=max_tokens rows one token short now and then).
            while cfg.stop and count and ids[count - 1] == self.pad_id:
                count -= 1
        text = self.tokenizer.decode(ids[:count], skip_special_tokens=True)
        if cfg.stop:
            start = len(self.tokenizer.decode(ids[: cfg.min_tokens], skip_special_tokens=True))
            cut = _first_stop(text, cfg.stop, start)
            if cut is not None:
                text, reason = text[:cut], "stop"
        out = {
            "completion": text,
            "finish_reason": reason,
            "prompt_tokens": len(prompt.ids),
            "completion_tokens": count,
        }
        if logps is not None:
            out["logprobs"] = self._logprobs(ids[:count], logps[:count])
        return out

    def _logprobs(self, ids: list[int], logps: Any) -> list[dict]:
        """OpenAI's shape: per token, its log-probability and the top `logprobs` alternatives."""
        import torch

        k = self.cfg.logprobs or 0
        decode = self.tokenizer.decode
        entries = []
        for pos, t in enumerate(ids):
            row = logps[pos]
            entry: dict[str, Any] = {"token": decode([t]), "logprob": _finite(row[t].item())}
            if k:
                top = torch.topk(row, k)
                entry["top_logprobs"] = [
                    {"token": decode([i]), "logprob": _finite(v)}
                    for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=False)
                ]
            entries.append(entry)
        return entries


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _first_stop(text: str, stop: list[str], start: int) -> int | None:
    """Where the earliest stop string that ends after char `start` begins."""
    found = [i for s in stop if (i := text.find(s, max(0, start - len(s) + 1))) != -1]
    return min(found) if found else None


# ------------------------------------------------------------------ vLLM


class VllmEngine:
    """vLLM's offline `LLM` on CUDA; a LoRA adapter is served through `LoRARequest`."""

    name = "vllm"

    def __init__(self, llm: Any, tokenizer: Any, cfg: InferenceConfig, lora: Any) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.lora = lora

    @classmethod
    def load(cls, local: Any, cfg: InferenceConfig, *, n_gpus: int) -> VllmEngine:
        from transformers import AutoConfig
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        tokenizer = load_tokenizer(local.base, local.adapter, cfg.chat_template)
        max_len = cfg.max_model_len
        derived = getattr(AutoConfig.from_pretrained(local.base), "max_position_embeddings", None)
        if derived and derived < max_len:
            max_len = derived
        kwargs: dict[str, Any] = dict(
            model=local.base,
            tokenizer=local.adapter
            if local.adapter and Path(local.adapter, "tokenizer_config.json").exists()
            else local.base,
            tensor_parallel_size=max(1, n_gpus),
            max_num_seqs=cfg.max_num_seqs,
            max_model_len=max_len,
            gpu_memory_utilization=0.95,
            enable_prefix_caching=True,
            seed=cfg.seed if cfg.seed is not None else 0,
        )
        if cfg.quantization:
            kwargs["quantization"] = cfg.quantization
        if cfg.load_format:
            kwargs["load_format"] = cfg.load_format
        lora = None
        if local.adapter:
            rank = json.loads(Path(local.adapter, "adapter_config.json").read_text()).get("r", 16)
            kwargs.update(
                enable_lora=True,
                max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= rank), rank),
                max_loras=1,
            )
            lora = LoRARequest("adapter", 1, local.adapter)
        engine = cls(LLM(**kwargs), tokenizer, cfg, lora)
        engine.cfg = cfg.model_copy(update={"max_model_len": max_len})
        return engine

    def _params(self, prompt: Prompt) -> Any:
        from vllm import SamplingParams

        cfg = self.cfg
        return SamplingParams(
            n=cfg.n_completions_per_prompt,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=min(cfg.max_tokens, cfg.max_model_len - len(prompt.ids)),
            min_tokens=cfg.min_tokens,
            stop=list(cfg.stop) or None,
            logprobs=cfg.logprobs,
            seed=None if cfg.seed is None else cfg.seed + prompt.index,
            skip_special_tokens=True,
        )

    def generate(self, prompts: list[Prompt]) -> Iterator[list[tuple[Prompt, dict]]]:
        for start in range(0, len(prompts), VLLM_CHUNK_ROWS):
            chunk = prompts[start : start + VLLM_CHUNK_ROWS]
            outputs = self.llm.generate(
                [{"prompt_token_ids": p.ids} for p in chunk],
                sampling_params=[self._params(p) for p in chunk],
                lora_request=self.lora,
                use_tqdm=False,
            )
            yield [(p, self._output(p, o)) for p, o in zip(chunk, outputs, strict=False)]

    def _output(self, prompt: Prompt, result: Any) -> dict:
        seqs = []
        for c in result.outputs:
            seq = {
                "completion": c.text,
                "finish_reason": "stop" if c.finish_reason == "stop" else "length",
                "prompt_tokens": len(prompt.ids),
                "completion_tokens": len(c.token_ids),
            }
            if self.cfg.logprobs is not None:
                seq["logprobs"] = [
                    self._entry(t, lp) for t, lp in zip(c.token_ids, c.logprobs or [], strict=False)
                ]
            seqs.append(seq)
        return _combine(seqs)

    def _entry(self, token_id: int, logprobs: dict) -> dict:
        decode = self.tokenizer.decode
        chosen = logprobs.get(token_id)
        entry: dict[str, Any] = {
            "token": decode([token_id]),
            "logprob": _finite(chosen.logprob) if chosen is not None else None,
        }
        if self.cfg.logprobs:
            ranked = sorted(logprobs.items(), key=lambda kv: kv[1].logprob, reverse=True)
            entry["top_logprobs"] = [
                {"token": decode([i]), "logprob": _finite(lp.logprob)}
                for i, lp in ranked[: self.cfg.logprobs]
            ]
        return entry
