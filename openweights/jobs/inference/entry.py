"""Worker side of `ow.inference`: `python -m openweights.jobs.inference.entry`.

Reads its params from its own job, resolves the model (local dir, LoRA adapter, registered
fine-tune, Hub id), and generates with vLLM on CUDA or batched transformers elsewhere.

Finished rows are saved as they complete: every `save_every_s` a chunk file (`{"index", "row"}`
lines) is uploaded and named in an `inference_chunk` event. A retry of the job (a new run after a
lost worker, or a resubmitted failed job) reads those events from all earlier runs and generates
only the rows still missing. The result, `uploads/results.jsonl`, is written once, whole, at the
end: the worker stores it and `job.outputs["file"]` is its id, so no reader sees a partial row.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from openweights.jobs.inference.engines import InferenceError, Prompt
from openweights.jobs.inference.params import OPENAI_PREFIX, InferenceConfig

UPLOADS = Path("uploads")
RESULT = UPLOADS / "results.jsonl"
CHUNK_EVENT = "inference_chunk"


def load_rows(ow: Any, file_id: str) -> list[tuple[int, dict]]:
    """(line number, row) for each non-empty line."""
    text = ow.files.content(file_id).decode("utf-8")
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or ("messages" not in row and "text" not in row):
                raise InferenceError(
                    f"{file_id} line {n}: a row needs `messages` or `text` (a conversations row)"
                )
            rows.append((n, row))
    return rows


def finished_rows(ow: Any, events: list[dict]) -> dict[int, dict]:
    """Rows earlier runs of this job saved (`events`: their data): {index: output fields}."""
    done: dict[int, dict] = {}
    for data in events:
        if data.get("type") != CHUNK_EVENT or not data.get("chunk_file"):
            continue
        for line in ow.files.content(data["chunk_file"]).decode("utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                done[int(rec["index"])] = rec["row"]
    return done


class ChunkSaver:
    """Collects finished rows; uploads them as one chunk file per `every_s` (and at the end)."""

    def __init__(self, ow: Any, *, every_s: float, total: int, done: int) -> None:
        self.ow = ow
        self.every_s = every_s
        self.total = total
        self.done = done
        self.pending: list[tuple[int, dict]] = []
        self.last = time.monotonic()
        self.t0 = time.monotonic()
        self.new_tokens = 0

    def add(self, index: int, output: dict) -> None:
        self.pending.append((index, output))
        tokens = output["completion_tokens"]
        self.new_tokens += sum(tokens) if isinstance(tokens, list) else tokens

    def maybe_flush(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        body = "".join(
            json.dumps({"index": i, "row": out}, ensure_ascii=False) + "\n"
            for i, out in self.pending
        )
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
            f.write(body)
        try:
            fid = self.ow.files.upload(f.name, purpose="result").id
        finally:
            os.unlink(f.name)
        self.done += len(self.pending)
        elapsed = time.monotonic() - self.t0
        # The chunk counts only once its event is recorded: a run killed between the upload and
        # the event redoes these rows, never loses them.
        self.ow.run.log(
            {
                "type": CHUNK_EVENT,
                "chunk_file": fid,
                "rows": len(self.pending),
                "done": self.done,
                "total": self.total,
                "tokens_per_s": round(self.new_tokens / max(elapsed, 1e-9), 1),
            }
        )
        self.pending = []
        self.last = time.monotonic()


def load_engine(cfg: InferenceConfig, ow: Any) -> Any:
    """Resolve the model and start the engine; errors name the model."""
    from openweights.jobs.inference.engines import TransformersEngine, VllmEngine, is_vllm_available
    from openweights.jobs.model_source import ModelNotFoundError, resolve_model

    try:
        local = resolve_model(cfg.model, ow=ow)
    except ModelNotFoundError as e:
        raise InferenceError(f"model {cfg.model!r} cannot be used: {e}") from None
    import torch

    cuda = torch.cuda.is_available()
    want = cfg.engine
    if want == "vllm" and not (cuda and is_vllm_available()):
        raise InferenceError(
            'engine="vllm" needs a CUDA GPU and vLLM: pip install "openweights[vllm]"'
            if cuda
            else 'engine="vllm" needs a CUDA GPU; use engine="transformers" (or "auto") on CPU'
        )
    use_vllm = want == "vllm" or (want == "auto" and cuda and is_vllm_available())
    try:
        if use_vllm:
            return VllmEngine.load(local, cfg, n_gpus=int(os.environ.get("N_GPUS") or 1)), local
        return TransformersEngine.load(local, cfg), local
    except (OSError, ValueError) as e:
        where = f"base {local.base!r} + adapter {local.adapter!r}" if local.adapter else local.base
        raise InferenceError(f"model {cfg.model!r} ({where}) cannot be loaded: {e}") from None


def run(cfg: InferenceConfig, ow: Any, job_id: str) -> dict:
    t0 = time.monotonic()
    rows = load_rows(ow, cfg.input_file_id)
    earlier = [e.get("data") or {} for e in ow.events.list(job_id=job_id)]
    done = finished_rows(ow, earlier)
    done = {i: r for i, r in done.items() if i < len(rows)}
    todo = [i for i in range(len(rows)) if i not in done]
    info: dict[str, Any] = {"type": "engine", "rows": len(rows), "resumed_rows": len(done)}
    saver = ChunkSaver(ow, every_s=cfg.save_every_s, total=len(rows), done=len(done))
    if todo and cfg.model.startswith(OPENAI_PREFIX):
        from openweights.jobs.inference.openai_batch import OpenAIBatch

        batch = OpenAIBatch(cfg, log=ow.run.log)
        ow.run.log({**info, "engine": batch.name, "model": cfg.model})
        t_gen = time.monotonic()
        for index, output in sorted(batch.run([(i, rows[i]) for i in todo], earlier).items()):
            saver.add(index, output)
            done[index] = output
        saver.flush()  # what did come back is kept, even when some rows failed
        gen_s = time.monotonic() - t_gen
        if batch.failed:
            raise InferenceError(
                f"{len(batch.failed)} of {len(todo)} rows failed on OpenAI's Batch API: "
                + "; ".join(batch.failed[:5])
            )
    elif todo:
        engine, local = load_engine(cfg, ow)
        from openweights.jobs.inference.engines import render_prompts

        prompts: list[Prompt] = render_prompts(rows, engine.tokenizer, cfg, model_name=cfg.model)
        info.update(
            engine=engine.name,
            base=local.base,
            adapter=local.adapter,
            device=getattr(engine, "device", "cuda"),
        )
        ow.run.log(info)
        todo_set = set(todo)
        t_gen = time.monotonic()
        for finished in engine.generate([p for p in prompts if p.index in todo_set]):
            for prompt, output in finished:
                saver.add(prompt.index, output)
                done[prompt.index] = output
            saver.maybe_flush()
        saver.flush()
        gen_s = time.monotonic() - t_gen
    else:
        ow.run.log(info)
        gen_s = 0.0
    missing = [i for i in range(len(rows)) if i not in done]
    if missing:  # pragma: no cover - every generated row was saved above
        raise InferenceError(f"rows {missing[:10]} have no result")
    UPLOADS.mkdir(exist_ok=True)
    tmp = RESULT.with_suffix(".partial")
    prompt_tokens = completion_tokens = 0
    with tmp.open("w", encoding="utf-8") as f:
        for i, (_line, row) in enumerate(rows):
            out = done[i]
            prompt_tokens += out["prompt_tokens"]
            ct = out["completion_tokens"]
            completion_tokens += sum(ct) if isinstance(ct, list) else ct
            f.write(json.dumps({**row, **out}, ensure_ascii=False) + "\n")
    tmp.rename(RESULT)  # only a whole file is ever under uploads/
    return {
        "type": "result",
        "rows": len(rows),
        "generated_rows": len(todo),
        "resumed_rows": len(rows) - len(todo),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "generation_seconds": round(gen_s, 3),
        "tokens_per_s": round(saver.new_tokens / gen_s, 1) if gen_s else None,
        "seconds": round(time.monotonic() - t0, 3),
    }


def main() -> int:
    from openweights import OpenWeights

    ow = OpenWeights()
    job_id = os.environ["OPENWEIGHTS_JOB_ID"]
    job = ow.jobs.retrieve(job_id)
    cfg = InferenceConfig(**job.params["validated_params"])
    try:
        summary = run(cfg, ow, job_id)
    except InferenceError as e:
        print(f"inference failed: {e}", file=sys.stderr, flush=True)
        return 1
    ow.run.log(summary)
    print(f"inference on {cfg.model}: {json.dumps(summary)}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is uploaded or logged by now; tearing down torch and transformers at exit
    # took 8 s on a loaded 2-core machine, so skip it.
    os._exit(code)
