"""`ow.inference.create(model="openai/<name>", ...)`: the rows go to OpenAI's Batch API.

As in the original openweights, an `openai/` model is not run on the worker's hardware: the job
(which needs no GPU) uploads the rows as a batch file to the OpenAI API of the org's secrets
(`OPENAI_API_KEY`, and `OPENAI_BASE_URL` for any other server that speaks the Batch API, e.g.
another openweights server), waits for the batch, and writes the same result file as a local
engine: each input row plus `completion`, `finish_reason`, `prompt_tokens`, `completion_tokens`
(and `logprobs`). Unlike the original, it is a job like any other: content-hash id, events,
retries, the dashboard.

The batch id is recorded in an `openai_batch` event before waiting on it, so a retry of the job
(a lost worker, a resubmitted failure) waits on the same batch instead of paying for it twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from openweights.jobs.inference.engines import InferenceError
from openweights.jobs.inference.params import OPENAI_PREFIX, InferenceConfig

__all__ = ["BATCH_EVENT", "OpenAIBatch", "requests_for"]

BATCH_EVENT = "openai_batch"
ENDPOINT = "/v1/chat/completions"
#: OpenAI has no push for batches: poll, starting fast (small batches finish in seconds on a
#: local server) and backing off to this interval.
MAX_POLL_S = 30.0
_FAILED = ("failed", "expired", "cancelled", "canceled")


def requests_for(cfg: InferenceConfig, rows: list[tuple[int, dict]]) -> list[dict]:
    """One Batch API request line per (index, row); `custom_id` is the row's index."""
    name = cfg.model[len(OPENAI_PREFIX) :]
    body: dict[str, Any] = {
        "model": name,
        "max_completion_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
    }
    if cfg.n_completions_per_prompt > 1:
        body["n"] = cfg.n_completions_per_prompt
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    if cfg.stop:
        body["stop"] = cfg.stop
    if cfg.logprobs is not None:
        body["logprobs"] = True
        if cfg.logprobs:
            body["top_logprobs"] = cfg.logprobs
    lines = []
    for index, (line, row) in rows:
        if "messages" not in row:
            raise InferenceError(
                f"line {line}: OpenAI chat models need a `messages` row, not raw `text`"
            )
        lines.append(
            {
                "custom_id": str(index),
                "method": "POST",
                "url": ENDPOINT,
                "body": {**body, "messages": row["messages"]},
            }
        )
    return lines


def _logprobs(choice: dict) -> list[dict]:
    content = (choice.get("logprobs") or {}).get("content") or []
    out = []
    for entry in content:
        item: dict[str, Any] = {"token": entry.get("token"), "logprob": entry.get("logprob")}
        if entry.get("top_logprobs"):
            item["top_logprobs"] = [
                {"token": t.get("token"), "logprob": t.get("logprob")}
                for t in entry["top_logprobs"]
            ]
        out.append(item)
    return out


def output_of(body: dict, cfg: InferenceConfig) -> dict:
    """A chat completion body as a result row's fields (lists when n > 1, as local engines)."""
    choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
    if not choices:
        raise ValueError("the answer has no choices")
    usage = body.get("usage") or {}

    def pack(values: list) -> Any:
        return values[0] if len(values) == 1 else values

    out: dict[str, Any] = {
        "completion": pack([(c.get("message") or {}).get("content") or "" for c in choices]),
        "finish_reason": pack([c.get("finish_reason") for c in choices]),
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        # OpenAI counts the n completions of a request together
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }
    if cfg.logprobs is not None:
        out["logprobs"] = pack([_logprobs(c) for c in choices])
    return out


class OpenAIBatch:
    """Runs the rows still missing through one Batch API batch and yields their outputs."""

    name = "openai-batch"

    def __init__(
        self,
        cfg: InferenceConfig,
        *,
        log: Callable[[dict], Any],
        client: Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.sleep = sleep
        self.client = client if client is not None else self._client()
        #: "row N: why" for each row the batch did not answer
        self.failed: list[str] = []

    @staticmethod
    def _client() -> Any:
        if not os.environ.get("OPENAI_API_KEY"):
            raise InferenceError(
                "openai/ models run on OpenAI's Batch API and need the org secret "
                "OPENAI_API_KEY: `ow env set OPENAI_API_KEY=sk-...` (and OPENAI_BASE_URL for "
                "another server that speaks the Batch API)"
            )
        try:
            import openai
        except ImportError as e:
            raise InferenceError(
                'openai/ models need the openai client on the worker: pip install "openweights[openai]"'
            ) from e
        return openai.OpenAI(max_retries=5)

    def run(self, rows: list[tuple[int, tuple[int, dict]]], earlier: list[dict]) -> dict[int, dict]:
        """{index: output} for `rows`; resumes the batch an earlier run of this job submitted."""
        want = sorted(i for i, _ in rows)
        batch_id = next(
            (
                e["batch_id"]
                for e in reversed(earlier)
                if e.get("type") == BATCH_EVENT and e.get("indices") == want
            ),
            None,
        )
        batch = self.client.batches.retrieve(batch_id) if batch_id else None
        if batch is None or batch.status in _FAILED:
            batch = self._submit(rows, want)
        batch = self._wait(batch)
        return self._collect(batch, want)

    def _submit(self, rows: list[tuple[int, tuple[int, dict]]], want: list[int]) -> Any:
        body = "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in requests_for(self.cfg, rows)
        )
        upload = self.client.files.create(
            file=("openweights-inference.jsonl", body.encode("utf-8")), purpose="batch"
        )
        batch = self.client.batches.create(
            input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h"
        )
        # recorded before waiting: a retry of this job waits on this batch, never a second one
        self.log({"type": BATCH_EVENT, "batch_id": batch.id, "indices": want, "rows": len(want)})
        return batch

    def _wait(self, batch: Any) -> Any:
        delay = 0.5
        last = None
        while batch.status not in ("completed", *_FAILED):
            counts = getattr(batch, "request_counts", None)
            seen = (batch.status, getattr(counts, "completed", None))
            if seen != last:
                print(f"openai batch {batch.id}: {batch.status} {counts}", flush=True)
                last = seen
            self.sleep(delay)
            delay = min(MAX_POLL_S, delay * 1.5)
            batch = self.client.batches.retrieve(batch.id)
        if batch.status != "completed":
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            why = "; ".join(getattr(e, "message", str(e)) for e in errors[:3])
            raise InferenceError(
                f"OpenAI batch {batch.id} ended {batch.status}: {why or 'no reason given'}"
            )
        return batch

    def _lines(self, file_id: str | None) -> list[dict]:
        if not file_id:
            return []
        text = self.client.files.content(file_id).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def _collect(self, batch: Any, want: list[int]) -> dict[int, dict]:
        done: dict[int, dict] = {}
        failed: list[str] = []
        for line in self._lines(batch.output_file_id) + self._lines(batch.error_file_id):
            index = int(line["custom_id"])
            response = line.get("response") or {}
            error = line.get("error")
            if not error and response.get("status_code") == 200:
                try:
                    done[index] = output_of(response.get("body") or {}, self.cfg)
                    continue
                except (ValueError, TypeError) as e:
                    error = {"message": str(e)}
            body = response.get("body") or {}
            message = (error or body.get("error") or {}).get("message") or str(error or body)
            failed.append(f"row {index}: {message}")
        missing = [
            i for i in want if i not in done and not any(f.startswith(f"row {i}:") for f in failed)
        ]
        failed += [f"row {i}: no answer in the batch's files" for i in missing]
        self.failed = failed
        return done
