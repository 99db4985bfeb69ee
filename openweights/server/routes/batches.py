"""The OpenAI Batch API (`/v1/batches`) on top of `ow.inference` jobs.

Code written for OpenAI's batch API runs unchanged against openweights with the official client:
`client.files.create(file=..., purpose="batch")`, `client.batches.create(...)`, `retrieve`, `list`,
`cancel`, `client.files.content(batch.output_file_id)`.

- `create` reads the input file (one `{"custom_id", "method": "POST", "url", "body"}` per line),
  refuses a bad line naming its number and field, groups the requests by model and sampling
  parameters, and submits one inference job per group over a conversations file it stores
  (rows carry their `custom_id`).
- The batch itself is an immutable record (a `batch` file named `openweights-batch.json`, the
  batch id is `batch_<its hash>`); its status is derived from its jobs every time it is read.
- When every job has finished, `retrieve` assembles the output file (OpenAI's
  `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}` lines, in input
  order) and an error file for the requests of jobs that failed or were canceled. Both are
  content-addressed, so reading a finished batch again gives the same file ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from openweights import types as t
from openweights.server.auth import principal, require
from openweights.server.routes._errors import ERROR_RESPONSES
from openweights.store import files as fstore
from openweights.store import jobs as q
from openweights.store.errors import Invalid, NotFound
from openweights.store.orgs import Principal

router = APIRouter(prefix="/v1", tags=["batches"], responses=ERROR_RESPONSES)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
META_FILENAME = "openweights-batch.json"
WINDOW_S = 24 * 3600
#: Request body keys we honour (or that change nothing); any other key is refused by name.
_COMMON_KEYS = {
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "logprobs",
    "min_tokens",
    "user",
    "stream",
}
_KEYS = {
    "/v1/chat/completions": _COMMON_KEYS | {"messages", "top_logprobs"},
    "/v1/completions": _COMMON_KEYS | {"prompt"},
}


class BatchCreateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="A `batch` file: one request per line.")
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    #: openweights: the inference jobs that run this batch
    job_ids: list[str] = Field(default_factory=list)


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


# ------------------------------------------------------------------ blobs and files


def _read(state, org_id: str, file_id: str) -> tuple[dict, bytes]:
    with state.db.read() as conn:
        row = fstore.get_file(conn, org_id, file_id)
    return row, b"".join(state.blobs.iter_bytes(row["sha256"]))


def _store(state, org_id: str, data: bytes, *, purpose: str, filename: str) -> str:
    """Store bytes as a file of this org (validated for its purpose); returns the file id."""
    from openweights.validation import FileValidationError, validate_jsonl

    sha = hashlib.sha256(data).hexdigest()
    fd, name = tempfile.mkstemp(dir=state.tmp_dir, prefix="batch-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            validate_jsonl(path, purpose, filename=filename)
        except FileValidationError as e:  # pragma: no cover - rows are built from checked input
            raise Invalid(str(e), param="input_file_id") from e
        state.blobs.put_file(sha, path)
        with state.db.write() as conn:
            row = fstore.add_file(
                conn,
                org_id=org_id,
                purpose=purpose,
                filename=filename,
                size=len(data),
                sha256=sha,
                now=state.db.now(conn),
            )
        return row["id"]
    finally:
        path.unlink(missing_ok=True)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


# ------------------------------------------------------------------ reading requests


def _bad(file_id: str, line: int, field: str, message: str) -> Invalid:
    return Invalid(f"{file_id} line {line}: {field}: {message}", param=f"line {line}: {field}")


def _requests(file_id: str, data: bytes, endpoint: str) -> list[tuple[int, str, dict]]:
    """(line, custom_id, body) per request; a bad line raises naming its number and field."""
    out: list[tuple[int, str, dict]] = []
    seen: set[str] = set()
    for n, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            req = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _bad(file_id, n, "(line)", f"not JSON ({e.msg})") from None
        if not isinstance(req, dict):
            raise _bad(file_id, n, "(line)", "must be a JSON object")
        cid = req.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise _bad(file_id, n, "custom_id", "required: a non-empty string")
        if cid in seen:
            raise _bad(file_id, n, "custom_id", f"{cid!r} is used twice")
        seen.add(cid)
        if req.get("method", "POST") != "POST":
            raise _bad(file_id, n, "method", "must be POST")
        if req.get("url") != endpoint:
            raise _bad(file_id, n, "url", f"must be the batch's endpoint {endpoint!r}")
        body = req.get("body")
        if not isinstance(body, dict):
            raise _bad(file_id, n, "body", "required: the request body object")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _bad(file_id, n, "body.model", "required: a model name")
        unknown = sorted(set(body) - _KEYS[endpoint])
        if unknown:
            raise _bad(file_id, n, f"body.{unknown[0]}", "not supported by openweights batches")
        if body.get("stream"):
            raise _bad(file_id, n, "body.stream", "batches do not stream")
        if endpoint == "/v1/chat/completions":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise _bad(file_id, n, "body.messages", "required: a non-empty list of messages")
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                    raise _bad(file_id, n, f"body.messages[{i}].role", "system, user or assistant")
                c = m.get("content")
                if not isinstance(c, str) and not (
                    isinstance(c, list)
                    and all(isinstance(b, dict) and isinstance(b.get("text"), str) for b in c)
                ):
                    raise _bad(file_id, n, f"body.messages[{i}].content", "a string or text parts")
        elif not isinstance(body.get("prompt"), str):
            raise _bad(file_id, n, "body.prompt", "required: a string")
        out.append((n, cid, body))
    if not out:
        raise Invalid(f"{file_id}: the batch has no requests", param="input_file_id")
    return out


def _sampling(body: dict, endpoint: str) -> dict[str, Any]:
    """OpenAI request parameters → `ow.inference` parameters."""
    p: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        p["max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "seed", "min_tokens"):
        if body.get(key) is not None:
            p[key] = body[key]
    stop = body.get("stop")
    if stop:
        p["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("n"):
        p["n_completions_per_prompt"] = body["n"]
    if endpoint == "/v1/chat/completions":
        if body.get("logprobs"):
            p["logprobs"] = body.get("top_logprobs") or 0
    elif body.get("logprobs") is not None:
        p["logprobs"] = body["logprobs"]
    return p


def _row(body: dict, cid: str) -> dict:
    if "messages" in body:
        return {"messages": body["messages"], "custom_id": cid}
    return {"text": body["prompt"], "custom_id": cid}


# ------------------------------------------------------------------ the batch record


def _batch_id(meta_file_id: str) -> str:
    return "batch_" + meta_file_id.rsplit("-", 1)[-1]


def _meta_file_id(batch_id: str) -> str:
    if not batch_id.startswith("batch_"):
        raise NotFound(f"Batch {batch_id!r} not found.")
    return "batch:file-" + batch_id.removeprefix("batch_")


def _load_meta(state, org_id: str, batch_id: str) -> dict:
    try:
        row, data = _read(state, org_id, _meta_file_id(batch_id))
    except NotFound:
        raise NotFound(f"Batch {batch_id!r} not found.") from None
    if row["filename"] != META_FILENAME:
        raise NotFound(f"Batch {batch_id!r} not found.")
    return json.loads(data)


def _ts(x: float | None) -> int | None:
    return int(x) if x is not None else None


def _choice_chat(k: int, text: str, reason: str, logprobs: Any) -> dict:
    choice: dict[str, Any] = {
        "index": k,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "finish_reason": reason,
        "logprobs": None,
    }
    if logprobs is not None:
        choice["logprobs"] = {
            "content": [
                {
                    "token": e["token"],
                    "logprob": e["logprob"],
                    "bytes": list(e["token"].encode()),
                    "top_logprobs": [
                        {**a, "bytes": list(a["token"].encode())} for a in e.get("top_logprobs", [])
                    ],
                }
                for e in logprobs
            ],
            "refusal": None,
        }
    return choice


def _choice_text(k: int, text: str, reason: str, logprobs: Any) -> dict:
    choice: dict[str, Any] = {"index": k, "text": text, "finish_reason": reason, "logprobs": None}
    if logprobs is not None:
        choice["logprobs"] = {
            "tokens": [e["token"] for e in logprobs],
            "token_logprobs": [e["logprob"] for e in logprobs],
            "top_logprobs": [
                {a["token"]: a["logprob"] for a in e.get("top_logprobs", [])} for e in logprobs
            ],
            "text_offset": None,
        }
    return choice


def _response_line(batch_id: str, endpoint: str, job: dict, row: dict) -> dict:
    several = isinstance(row["completion"], list)  # n_completions_per_prompt > 1

    def as_list(v: Any) -> list:
        return v if several else [v]

    texts = as_list(row["completion"])
    reasons = as_list(row["finish_reason"])
    counts = as_list(row["completion_tokens"])
    lps = as_list(row["logprobs"]) if "logprobs" in row else [None] * len(texts)
    chat = endpoint == "/v1/chat/completions"
    make = _choice_chat if chat else _choice_text
    rid = hashlib.sha256(f"{batch_id}/{row['custom_id']}".encode()).hexdigest()[:24]
    body = {
        "id": ("chatcmpl-" if chat else "cmpl-") + rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": _ts(job["finished_at"]) or 0,
        "model": job["params"]["validated_params"]["model"],
        "choices": [make(k, *v) for k, v in enumerate(zip(texts, reasons, lps, strict=True))],
        "usage": {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": sum(counts),
            "total_tokens": row["prompt_tokens"] + sum(counts),
        },
    }
    return {
        "id": f"batch_req_{rid}",
        "custom_id": row["custom_id"],
        "response": {"status_code": 200, "request_id": f"{job['id']}", "body": body},
        "error": None,
    }


def _error_line(batch_id: str, cid: str, code: str, message: str) -> dict:
    rid = hashlib.sha256(f"{batch_id}/{cid}".encode()).hexdigest()[:24]
    return {
        "id": f"batch_req_{rid}",
        "custom_id": cid,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _view(state, org_id: str, batch_id: str, meta: dict) -> BatchObject:
    """The batch as its jobs stand now; output files are assembled once every job has finished."""
    with state.db.read() as conn:
        jobs = [q.get_job(conn, org_id, j["id"]) for j in meta["jobs"]]
    total = sum(j["rows"] for j in meta["jobs"])
    statuses = [j["status"] for j in jobs]
    counts = BatchRequestCounts(
        total=total,
        completed=sum(
            m["rows"] for m, j in zip(meta["jobs"], jobs, strict=True) if j["status"] == "completed"
        ),
        failed=sum(
            m["rows"] for m, j in zip(meta["jobs"], jobs, strict=True) if j["status"] == "failed"
        ),
    )
    started = [j["started_at"] for j in jobs if j.get("started_at")]
    finished = [j["finished_at"] or j["updated_at"] for j in jobs]
    obj = BatchObject(
        id=batch_id,
        endpoint=meta["endpoint"],
        input_file_id=meta["input_file_id"],
        completion_window=meta["completion_window"],
        status="in_progress" if started else "validating",
        created_at=meta["created_at"],
        in_progress_at=_ts(min(started)) if started else None,
        expires_at=meta["created_at"] + WINDOW_S,
        request_counts=counts,
        metadata=meta.get("metadata"),
        job_ids=[j["id"] for j in jobs],
    )
    terminal = all(s in t.TERMINAL_STATUSES for s in statuses)
    if "canceled" in statuses:
        obj.status = "cancelled" if terminal else "cancelling"
        obj.cancelling_at = _ts(min(j["updated_at"] for j in jobs if j["status"] == "canceled"))
        if terminal:
            obj.cancelled_at = _ts(max(finished))
    if not terminal:
        return obj
    # every job has finished: assemble the files (same content → same ids on every read)
    order = meta["custom_ids"]
    lines: dict[str, dict] = {}
    errors: dict[str, dict] = {}
    for m, job in zip(meta["jobs"], jobs, strict=True):
        if job["status"] == "completed":
            _, data = _read(state, org_id, job["outputs"]["file"])
            for raw in data.decode().splitlines():
                row = json.loads(raw)
                lines[row["custom_id"]] = _response_line(batch_id, meta["endpoint"], job, row)
        else:
            code = "batch_cancelled" if job["status"] == "canceled" else "job_failed"
            message = (job.get("error") or job["status"]).strip().splitlines()[0][:500]
            message = f"inference job {job['id']} {job['status']}: {message}"
            for cid in m["custom_ids"]:
                errors[cid] = _error_line(batch_id, cid, code, message)
    out = [lines[c] for c in order if c in lines]
    err = [errors[c] for c in order if c in errors]
    if out:
        obj.output_file_id = _store(
            state, org_id, _jsonl(out), purpose="batch_output", filename=f"{batch_id}_output.jsonl"
        )
    if err:
        obj.error_file_id = _store(
            state, org_id, _jsonl(err), purpose="batch_output", filename=f"{batch_id}_error.jsonl"
        )
    done_at = _ts(max(finished))
    if obj.status == "cancelled":
        return obj
    if not out:
        obj.status, obj.failed_at = "failed", done_at
        obj.errors = BatchErrors(
            data=[
                BatchError(code=e["error"]["code"], message=e["error"]["message"]) for e in err[:1]
            ]
        )
    else:
        obj.status, obj.finalizing_at, obj.completed_at = "completed", done_at, done_at
    return obj


# ------------------------------------------------------------------ routes


@router.post("/batches", response_model=BatchObject)
async def create_batch(
    body: BatchCreateParams, request: Request, p: Principal = Depends(principal)
) -> BatchObject:
    """Run a file of chat (or text) completion requests as inference jobs (OpenAI's Batch API)."""
    require(p, "user")
    state = request.app.state.ow
    from openweights.client._errors import InvalidParamsError
    from openweights.jobs.inference import Inference
    from openweights.server.routes.jobs import create as create_job

    def plan():
        file_row, data = _read(state, p.org_id, body.input_file_id)
        if file_row["purpose"] != "batch":
            raise Invalid(
                f"input_file_id: {body.input_file_id} has purpose {file_row['purpose']!r}; "
                "upload the requests with purpose='batch'.",
                param="input_file_id",
            )
        groups: dict[tuple[str, str], list[tuple[int, str, dict]]] = {}
        for n, cid, req in _requests(body.input_file_id, data, body.endpoint):
            params = _sampling(req, body.endpoint)
            key = (req["model"], json.dumps(params, sort_keys=True))
            groups.setdefault(key, []).append((n, cid, req))
        prepared = []
        for (model, params_json), reqs in groups.items():
            rows = [_row(req, cid) for _, cid, req in reqs]
            conv = _store(
                state,
                p.org_id,
                _jsonl(rows),
                purpose="conversations",
                filename="batch-requests.jsonl",
            )
            try:
                job = Inference(None).prepare(  # type: ignore[arg-type]
                    model=model, input_file_id=conv, **json.loads(params_json)
                )
            except InvalidParamsError as e:
                raise _bad(body.input_file_id, reqs[0][0], "body", str(e)) from None
            prepared.append((job.request, [cid for _, cid, _ in reqs]))
        return prepared, [cid for reqs in groups.values() for _, cid, _ in reqs], data

    prepared, _, data = await state.call(plan)
    jobs = []
    for req, cids in prepared:
        job = await create_job(state, p, req)
        jobs.append({"id": job.id, "model": req.model, "rows": len(cids), "custom_ids": cids})
    order = [cid for _, cid, _ in _requests(body.input_file_id, data, body.endpoint)]
    meta = {
        "object": "openweights.batch",
        "input_file_id": body.input_file_id,
        "endpoint": body.endpoint,
        "completion_window": body.completion_window,
        "metadata": body.metadata,
        "created_at": int(time.time()),
        "jobs": jobs,
        "custom_ids": order,
    }

    def record():
        fid = _store(
            state,
            p.org_id,
            json.dumps(meta, sort_keys=True).encode(),
            purpose="batch",
            filename=META_FILENAME,
        )
        return _view(state, p.org_id, _batch_id(fid), meta)

    return await state.call(record)


@router.get("/batches/{batch_id}", response_model=BatchObject)
async def retrieve_batch(
    batch_id: str, request: Request, p: Principal = Depends(principal)
) -> BatchObject:
    """The batch's status; once every job has finished, its output and error files."""
    state = request.app.state.ow
    return await state.call(
        lambda: _view(state, p.org_id, batch_id, _load_meta(state, p.org_id, batch_id))
    )


@router.get("/batches", response_model=BatchList)
async def list_batches(
    request: Request,
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = None,
    p: Principal = Depends(principal),
) -> BatchList:
    """This organization's batches, newest first."""
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            rows, more = fstore.list_files(
                conn,
                p.org_id,
                purpose="batch",
                limit=limit,
                after=_meta_file_id(after) if after else None,
            )
        data = []
        for row in rows:
            if row["filename"] != META_FILENAME:
                continue
            bid = _batch_id(row["id"])
            data.append(_view(state, p.org_id, bid, _load_meta(state, p.org_id, bid)))
        return BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    return await state.call(work)


@router.post("/batches/{batch_id}/cancel", response_model=BatchObject)
async def cancel_batch(
    batch_id: str, request: Request, p: Principal = Depends(principal)
) -> BatchObject:
    """Cancel the batch's unfinished jobs; finished requests stay in the output file."""
    require(p, "user")
    state = request.app.state.ow
    from openweights.server.routes.jobs import cancel_job

    def jobs_of_batch():
        meta = _load_meta(state, p.org_id, batch_id)
        with state.db.read() as conn:
            return meta, [q.get_job(conn, p.org_id, j["id"]) for j in meta["jobs"]]

    meta, jobs = await state.call(jobs_of_batch)
    for job in jobs:
        if job["status"] not in t.TERMINAL_STATUSES:
            await cancel_job(job["id"], request, p)
    return await state.call(lambda: _view(state, p.org_id, batch_id, meta))
