"""`ow.files`: content-addressed files (`{purpose}:file-{sha256[:12]}`).

Uploads stream from disk as the raw request body: memory stays flat for any file size.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import io
import os
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from openweights._exceptions import OpenWeightsError
from openweights.client._models import File
from openweights.client._progress import PROGRESS_MIN_BYTES, byte_bar, count_bar
from openweights.client._resource import AsyncResource, SyncResource

__all__ = ["AsyncFiles", "File", "Files", "compute_file_id", "file_id_of_path", "is_file_id"]

CHUNK_BYTES = 1 << 20
#: Read timeout of an upload: the server validates the whole file before it answers.
UPLOAD_TIMEOUT_S = 600.0
#: `POST /v1/files/check` takes at most this many ids at once.
CHECK_BATCH = 10_000
#: small files of one call (a job's mounts) in flight at once, each its own request; larger ones
#: (over `PROGRESS_MIN_BYTES`) go one at a time, each with its progress bar
UPLOAD_CONCURRENCY = 8
_FILE_ID = re.compile(r"^[a-z_]+:file-[0-9a-f]{12}$")

FileInput = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | tuple


def compute_file_id(purpose: str, content: bytes) -> str:
    """The id the server gives `content` uploaded with `purpose`."""
    return f"{purpose}:file-{hashlib.sha256(content).hexdigest()[:12]}"


def file_id_of_path(purpose: str, path: str | os.PathLike) -> str:
    """The id the server gives this file's bytes (hashed in chunks, never read whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return f"{purpose}:file-{h.hexdigest()[:12]}"


def is_file_id(value: object) -> bool:
    return isinstance(value, str) and bool(_FILE_ID.match(value))


# ---------------------------------------------------------------- I/O-free request building


@dataclass
class _Source:
    """What to upload: a name, a size if known, and how to (re)open the bytes."""

    filename: str
    size: int | None
    path: Path | None = None
    data: bytes | None = None
    fileobj: Any = None
    start: int | None = None  # seek position of a seekable file object; None: read once only

    @property
    def resendable(self) -> bool:
        return self.fileobj is None or self.start is not None


def _source(file: FileInput) -> _Source:
    if isinstance(file, tuple):
        if len(file) < 2:
            raise TypeError(
                "file=(filename, content) expects a name and the bytes or a file object."
            )
        src = _source(file[1])
        src.filename = os.path.basename(str(file[0])) or src.filename
        return src
    if isinstance(file, str | os.PathLike):
        path = Path(file)
        if not path.is_file():
            raise OpenWeightsError(f"Cannot upload {str(path)!r}: no such file.")
        return _Source(filename=path.name, size=path.stat().st_size, path=path)
    if isinstance(file, bytes | bytearray | memoryview):
        data = bytes(file)
        return _Source(filename="upload", size=len(data), data=data)
    if hasattr(file, "read"):
        name = getattr(file, "name", None)
        filename = os.path.basename(name) if isinstance(name, str) else "upload"
        start = size = None
        try:
            if file.seekable():
                start = file.tell()
                size = file.seek(0, io.SEEK_END) - start
                file.seek(start)
        except (AttributeError, OSError, ValueError):
            start = size = None
        return _Source(filename=filename, size=size, fileobj=file, start=start)
    raise TypeError(
        f"file= must be a path, bytes or a binary file object, not {type(file).__name__}."
    )


def _upload_query(purpose: str, filename: str) -> dict[str, Any]:
    return {"purpose": purpose, "filename": filename}


def _upload_headers(size: int | None) -> dict[str, str]:
    headers = {"Content-Type": "application/octet-stream"}
    if size is not None:
        headers["Content-Length"] = str(size)
    return headers


def _as_bytes(chunk: Any) -> bytes:
    return chunk.encode() if isinstance(chunk, str) else bytes(chunk)


def _iter_source(src: _Source, bar: Any) -> Iterator[bytes]:
    bar.reset(total=src.size)
    if src.path is not None:
        with open(src.path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                bar.update(len(chunk))
                yield chunk
        return
    f = src.fileobj
    if src.start is not None:
        f.seek(src.start)
    while chunk := f.read(CHUNK_BYTES):
        bar.update(len(chunk))
        yield _as_bytes(chunk)


async def _aiter_source(src: _Source, bar: Any) -> AsyncIterator[bytes]:
    bar.reset(total=src.size)
    if src.path is not None:
        with open(src.path, "rb") as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
                bar.update(len(chunk))
                yield chunk
        return
    f = src.fileobj
    if src.start is not None:
        f.seek(src.start)
    while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
        bar.update(len(chunk))
        yield _as_bytes(chunk)


def _parse_file(body: dict[str, Any]) -> File:
    return File.model_validate(body)


def _download_target(path: str | os.PathLike) -> Path:
    return Path(path)


def _batches(ids: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), CHECK_BATCH):
        yield ids[i : i + CHECK_BATCH]


def _content_length(response: Any) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


def _tmp_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part-{os.getpid()}")


# ---------------------------------------------------------------- sync


class Files(SyncResource):
    """`ow.files`: upload, list, read and download files."""

    def upload(self, path: str | os.PathLike, *, purpose: str) -> File:
        """Upload a file from disk, streamed; skips the transfer when the server has its bytes."""
        src = _source(Path(path))
        if src.size is not None and src.size >= PROGRESS_MIN_BYTES:
            # Big files: hashing locally is much cheaper than sending them again.
            fid = file_id_of_path(purpose, src.path)  # type: ignore[arg-type]
            if not self.check([fid]):
                return self.retrieve(fid)
        return self._send(src, purpose)

    def create(self, *, file: FileInput, purpose: str) -> File:
        """Upload a path, bytes, a binary file object or a `(filename, content)` tuple."""
        return self._send(_source(file), purpose)

    def _send(self, src: _Source, purpose: str) -> File:
        if src.data is not None:
            content: Any = src.data
            bar = byte_bar(None, "", show=False)
        else:
            bar = byte_bar(src.size, f"upload {src.filename}")

            def content() -> Iterator[bytes]:
                return _iter_source(src, bar)

        try:
            response = self._http.request(
                "POST",
                "/v1/files",
                params=_upload_query(purpose, src.filename),
                content=content,
                headers=_upload_headers(src.size),
                timeout_s=UPLOAD_TIMEOUT_S,
                retry=src.resendable,  # same bytes → same id: resending is safe
            )
        finally:
            bar.close()
        return _parse_file(response.json())

    def retrieve(self, file_id: str) -> File:
        return _parse_file(self._http.request("GET", f"/v1/files/{file_id}").json())

    def list(self, *, purpose: str | None = None, limit: int = 100) -> list[File]:
        """Files of the organization, newest first."""
        return self._list(
            "/v1/files", params={"purpose": purpose}, limit=limit, page_max=1000, parse=_parse_file
        )

    def content(self, file_id: str) -> bytes:
        """The file's bytes, in memory. Use `download()` for big files."""
        return self._http.request("GET", f"/v1/files/{file_id}/content").content

    def iter_content(self, file_id: str) -> Iterator[bytes]:
        """The file's bytes in chunks, streamed."""
        with self._http.stream_response("GET", f"/v1/files/{file_id}/content") as response:
            yield from response.iter_bytes(CHUNK_BYTES)

    def download(self, file_id: str, path: str | os.PathLike) -> Path:
        """Stream the file to `path` (a directory: its original filename inside it)."""
        dest = _download_target(path)
        if dest.is_dir():
            dest = dest / self.retrieve(file_id).filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(dest)
        try:
            with self._http.stream_response("GET", f"/v1/files/{file_id}/content") as response:
                bar = byte_bar(_content_length(response), f"download {dest.name}")
                try:
                    with open(tmp, "wb") as f:
                        for chunk in response.iter_bytes(CHUNK_BYTES):
                            f.write(chunk)
                            bar.update(len(chunk))
                finally:
                    bar.close()
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def check(self, ids: builtins.list[str]) -> builtins.list[str]:
        """Which of these ids the server does not have (so they must be uploaded)."""
        missing: list[str] = []
        for batch in _batches(list(ids)):
            body = self._http.request(
                "POST", "/v1/files/check", json={"ids": batch}, retry=True
            ).json()
            missing.extend(body["missing"])
        return missing

    def _upload_paths(self, paths: dict[str, Path], *, purpose: str) -> dict[str, str]:
        """Upload the files whose locally computed id the server lacks; local id → server id.
        Small ones `UPLOAD_CONCURRENCY` at a time (one request each), large ones in turn."""
        from concurrent.futures import ThreadPoolExecutor

        ids = {fid: fid for fid in paths}
        small, large = _by_size(self.check(list(paths)), paths)
        if small:
            bar = count_bar(len(small), "upload files")

            def send(fid: str) -> str:
                out = self._send(_source(paths[fid]), purpose).id
                bar.update()
                return out

            try:
                with ThreadPoolExecutor(min(UPLOAD_CONCURRENCY, len(small))) as pool:
                    futures = [pool.submit(send, fid) for fid in small]
                    try:
                        ids.update(zip(small, (f.result() for f in futures), strict=True))
                    finally:  # a failed upload: those not started yet are not sent
                        for f in futures:
                            f.cancel()
            finally:
                bar.close()
        for fid in large:
            ids[fid] = self._send(_source(paths[fid]), purpose).id
        return ids


# ---------------------------------------------------------------- async


class AsyncFiles(AsyncResource):
    """`ow.files` of `AsyncOpenWeights`."""

    async def upload(self, path: str | os.PathLike, *, purpose: str) -> File:
        """Upload a file from disk, streamed; skips the transfer when the server has its bytes."""
        src = _source(Path(path))
        if src.size is not None and src.size >= PROGRESS_MIN_BYTES:
            fid = await asyncio.to_thread(file_id_of_path, purpose, src.path)  # type: ignore[arg-type]
            if not await self.check([fid]):
                return await self.retrieve(fid)
        return await self._send(src, purpose)

    async def create(self, *, file: FileInput, purpose: str) -> File:
        """Upload a path, bytes, a binary file object or a `(filename, content)` tuple."""
        return await self._send(_source(file), purpose)

    async def _send(self, src: _Source, purpose: str) -> File:
        if src.data is not None:
            content: Any = src.data
            bar = byte_bar(None, "", show=False)
        else:
            bar = byte_bar(src.size, f"upload {src.filename}")

            def content() -> AsyncIterator[bytes]:
                return _aiter_source(src, bar)

        try:
            response = await self._http.request(
                "POST",
                "/v1/files",
                params=_upload_query(purpose, src.filename),
                content=content,
                headers=_upload_headers(src.size),
                timeout_s=UPLOAD_TIMEOUT_S,
                retry=src.resendable,
            )
        finally:
            bar.close()
        return _parse_file(response.json())

    async def retrieve(self, file_id: str) -> File:
        return _parse_file((await self._http.request("GET", f"/v1/files/{file_id}")).json())

    async def list(self, *, purpose: str | None = None, limit: int = 100) -> list[File]:
        """Files of the organization, newest first."""
        return await self._list(
            "/v1/files", params={"purpose": purpose}, limit=limit, page_max=1000, parse=_parse_file
        )

    async def content(self, file_id: str) -> bytes:
        """The file's bytes, in memory. Use `download()` for big files."""
        return (await self._http.request("GET", f"/v1/files/{file_id}/content")).content

    async def iter_content(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks, streamed."""
        async with self._http.stream_response("GET", f"/v1/files/{file_id}/content") as response:
            async for chunk in response.aiter_bytes(CHUNK_BYTES):
                yield chunk

    async def download(self, file_id: str, path: str | os.PathLike) -> Path:
        """Stream the file to `path` (a directory: its original filename inside it)."""
        dest = _download_target(path)
        if dest.is_dir():
            dest = dest / (await self.retrieve(file_id)).filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_path(dest)
        try:
            async with self._http.stream_response(
                "GET", f"/v1/files/{file_id}/content"
            ) as response:
                bar = byte_bar(_content_length(response), f"download {dest.name}")
                try:
                    with open(tmp, "wb") as f:
                        async for chunk in response.aiter_bytes(CHUNK_BYTES):
                            f.write(chunk)
                            bar.update(len(chunk))
                finally:
                    bar.close()
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    async def check(self, ids: builtins.list[str]) -> builtins.list[str]:
        """Which of these ids the server does not have (so they must be uploaded)."""
        missing: list[str] = []
        for batch in _batches(list(ids)):
            response = await self._http.request(
                "POST", "/v1/files/check", json={"ids": batch}, retry=True
            )
            missing.extend(response.json()["missing"])
        return missing

    async def _upload_paths(self, paths: dict[str, Path], *, purpose: str) -> dict[str, str]:
        ids = {fid: fid for fid in paths}
        small, large = _by_size(await self.check(list(paths)), paths)
        if small:
            bar = count_bar(len(small), "upload files")
            gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

            async def send(fid: str) -> str:
                async with gate:
                    out = (await self._send(_source(paths[fid]), purpose)).id
                bar.update()
                return out

            tasks = [asyncio.ensure_future(send(fid)) for fid in small]
            try:
                ids.update(zip(small, await asyncio.gather(*tasks), strict=True))
            finally:  # a failed upload: the others are not left running
                for task in tasks:
                    task.cancel()
                bar.close()
        for fid in large:
            ids[fid] = (await self._send(_source(paths[fid]), purpose)).id
        return ids


def _by_size(ids: Iterable[str], paths: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(small, large): the files under `PROGRESS_MIN_BYTES`, and the others."""
    small: list[str] = []
    large: list[str] = []
    for fid in ids:
        (small if paths[fid].stat().st_size < PROGRESS_MIN_BYTES else large).append(fid)
    return small, large
