"""Files: streamed upload (validated before anything is stored), metadata, streamed download."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from openweights import types as t
from openweights.server import convert
from openweights.server.auth import principal, require
from openweights.server.routes._errors import ERROR_RESPONSES
from openweights.store import files as fstore
from openweights.store.errors import Invalid
from openweights.store.orgs import Principal
from openweights.types.files import PURPOSES

router = APIRouter(prefix="/v1", tags=["files"], responses=ERROR_RESPONSES)
FILENAME_MAX = 500


class _Spool:
    """Write chunks to a temp file while hashing them: memory stays flat for any size.

    The body arrives in small pieces (uvicorn hands over what one socket read gave); they are
    gathered into `BLOCK`s, and each block is written and hashed in a thread while the event
    loop receives the next one (hashlib and file writes release the GIL on big buffers). One
    block is in flight at a time, so at most two are held."""

    BLOCK = 1 << 20

    def __init__(self, tmp_dir: Path) -> None:
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
        self.path = Path(name)
        self.f = os.fdopen(fd, "wb")
        self.h = hashlib.sha256()
        self.size = 0
        self._parts: list[bytes] = []
        self._held = 0
        self._inflight: asyncio.Future | None = None

    def _write(self, block: bytes) -> None:
        self.f.write(block)
        self.h.update(block)

    async def write(self, chunk: bytes) -> None:
        self._parts.append(chunk)
        self._held += len(chunk)
        self.size += len(chunk)
        if self._held >= self.BLOCK:
            await self._flush()

    async def _flush(self) -> None:
        block = b"".join(self._parts) if len(self._parts) != 1 else self._parts[0]
        self._parts, self._held = [], 0
        if self._inflight is not None:
            await self._inflight
        self._inflight = asyncio.get_running_loop().run_in_executor(None, self._write, block)

    async def close(self) -> None:
        if self._held:
            await self._flush()
        if self._inflight is not None:
            await self._inflight
            self._inflight = None
        self.f.close()

    def discard(self) -> None:
        # a write still in flight (the request was cut short) finishes on a closed file or not
        # at all: its error is of no interest, the file is deleted
        if self._inflight is not None:
            self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.f.close()
        self.path.unlink(missing_ok=True)


class _File(FileResponse):
    """A local blob, sent in 1 MiB reads (Starlette reads 64 KiB, one thread hop each)."""

    chunk_size = 1 << 20


@router.post("/files", response_model=t.FileObject)
async def create_file(
    request: Request,
    purpose: str | None = Query(default=None, description="What the file is for."),
    filename: str | None = Query(default=None, max_length=FILENAME_MAX),
    p: Principal = Depends(principal),
) -> t.FileObject:
    """Upload a file: raw body with `?purpose=&filename=`, or multipart (`file`, `purpose`)."""
    state = request.app.state.ow
    spool = _Spool(state.tmp_dir)
    try:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=10)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise Invalid("Multipart upload needs a `file` part.", param="file")
            purpose = purpose or (
                form.get("purpose") if isinstance(form.get("purpose"), str) else None
            )
            filename = filename or upload.filename
            while chunk := await upload.read(1 << 20):
                await spool.write(chunk)
        else:
            async for chunk in request.stream():
                await spool.write(chunk)
        await spool.close()
        if not purpose:
            raise Invalid("Give the file's purpose, e.g. ?purpose=conversations.", param="purpose")
        if purpose not in PURPOSES:
            raise Invalid(
                f"Unknown purpose {purpose!r}; use one of {', '.join(PURPOSES)}.", param="purpose"
            )
        filename = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][
            :FILENAME_MAX
        ] or "upload"
        if p.kind == "worker" and purpose not in ("result", "log"):
            raise Invalid("Worker tokens upload only results and logs.", param="purpose")

        sha = spool.h.hexdigest()

        def store():
            from openweights.validation import FileValidationError, validate_jsonl

            try:
                validate_jsonl(spool.path, purpose, filename=filename)
            except FileValidationError as e:
                raise Invalid(
                    str(e), param=f"line {e.line}" + (f": {e.field}" if e.field else "")
                ) from e
            state.blobs.put_file(sha, spool.path)
            with state.db.write() as conn:
                return fstore.add_file(
                    conn,
                    org_id=p.org_id,
                    purpose=purpose,
                    filename=filename,
                    size=spool.size,
                    sha256=sha,
                    now=state.db.now(conn),
                )

        row = await state.call(store)
        return convert.file(row)
    finally:
        spool.discard()


@router.post("/files/check", response_model=t.FileCheckResponse)
async def check_files(
    body: t.FileCheckRequest, request: Request, p: Principal = Depends(principal)
) -> t.FileCheckResponse:
    """Which of these file ids this org does not have yet (to skip re-uploads)."""
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return fstore.missing_files(conn, p.org_id, body.ids)

    return t.FileCheckResponse(missing=await state.call(work))


@router.get("/files", response_model=t.Page[t.FileObject])
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    after: str | None = None,
    p: Principal = Depends(principal),
) -> t.Page[t.FileObject]:
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return fstore.list_files(conn, p.org_id, purpose=purpose, limit=limit, after=after)

    rows, more = await state.call(work)
    return t.Page[t.FileObject](data=[convert.file(r) for r in rows], has_more=more)


@router.get("/files/{file_id}", response_model=t.FileObject)
async def retrieve_file(
    file_id: str, request: Request, p: Principal = Depends(principal)
) -> t.FileObject:
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return fstore.get_file(conn, p.org_id, file_id)

    return convert.file(await state.call(work))


@router.get(
    "/files/{file_id}/content", responses={200: {"content": {"application/octet-stream": {}}}}
)
async def file_content(file_id: str, request: Request, p: Principal = Depends(principal)):
    """The file's bytes, streamed."""
    require(p, "user", "worker", "run")
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return fstore.get_file(conn, p.org_id, file_id)

    row = await state.call(work)
    headers = {"x-openweights-sha256": row["sha256"]}
    local = state.blobs.local_path(row["sha256"])
    if local is not None:
        return _File(
            local, media_type="application/octet-stream", filename=row["filename"], headers=headers
        )
    headers["content-length"] = str(row["bytes"])
    return StreamingResponse(
        state.blobs.iter_bytes(row["sha256"]),
        media_type="application/octet-stream",
        headers=headers,
    )
