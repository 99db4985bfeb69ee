"""Blob storage: content-addressed (key = sha256 of the bytes), on a local directory or S3.

Only the server touches it. Writes go through a temporary file that the server has already
hashed and validated, so a blob either exists whole or not at all.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

CHUNK = 1 << 20


class BlobStore(Protocol):
    def put_file(self, sha256: str, path: Path) -> None:
        """Store the file at `path` under `sha256` (may move it). A no-op when it exists."""

    def exists(self, sha256: str) -> bool: ...

    def iter_bytes(self, sha256: str, offset: int = 0) -> Iterator[bytes]: ...

    def local_path(self, sha256: str) -> Path | None:
        """A path the server can send directly, where the store is local."""


class LocalBlobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def put_file(self, sha256: str, path: Path) -> None:
        dest = self._path(sha256)
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, dest)  # atomic on one filesystem
        except OSError:
            tmp = dest.with_suffix(".part")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def iter_bytes(self, sha256: str, offset: int = 0) -> Iterator[bytes]:
        with open(self._path(sha256), "rb") as f:
            f.seek(offset)
            while chunk := f.read(CHUNK):
                yield chunk

    def local_path(self, sha256: str) -> Path | None:
        return self._path(sha256)


class S3Blobs:
    """An S3-compatible bucket (boto3). Endpoint and credentials come from boto3's own
    configuration (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …)."""

    def __init__(self, bucket: str, prefix: str, tmp_dir: Path) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError('S3 storage needs boto3: pip install "openweights[s3]"') from e
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
        self.transfer = TransferConfig(
            multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=4
        )
        self.tmp_dir = tmp_dir
        tmp_dir.mkdir(parents=True, exist_ok=True)

    def _key(self, sha256: str) -> str:
        return f"{self.prefix}/blobs/{sha256}" if self.prefix else f"blobs/{sha256}"

    def put_file(self, sha256: str, path: Path) -> None:
        if self.exists(sha256):
            return
        self.client.upload_file(str(path), self.bucket, self._key(sha256), Config=self.transfer)

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(sha256))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def iter_bytes(self, sha256: str, offset: int = 0) -> Iterator[bytes]:
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(sha256), **kwargs)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def local_path(self, sha256: str) -> Path | None:
        return None


def open_blob_store(url: str, home: Path) -> LocalBlobs | S3Blobs:
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Blobs(parsed.netloc, parsed.path, home / "tmp")
    if parsed.scheme in ("file", ""):
        return LocalBlobs(Path(parsed.path if parsed.scheme else url))
    raise ValueError(
        f"OPENWEIGHTS_STORAGE_URL: unsupported scheme {parsed.scheme!r} (use s3:// or file://)"
    )
