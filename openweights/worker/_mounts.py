"""Materialise a job's mounted files in its run directory.

`job.params["mounted_files"]` maps relative paths to file ids. The paths come from the submitter,
so every one is checked to stay inside the run directory before anything is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from openweights._exceptions import APIConnectionError, APIStatusError, InternalServerError
from openweights.client._base import SyncHTTP
from openweights.worker._retry import Backoff

__all__ = ["MountError", "download_mounts", "safe_join", "validate_mounts"]

logger = logging.getLogger(__name__)

_DOWNLOAD_ATTEMPTS = 4


class MountError(Exception):
    """A mounted file could not be placed. `infra` tells a transient failure from a bad job."""

    def __init__(self, message: str, *, infra: bool = False) -> None:
        super().__init__(message)
        self.infra = infra


def safe_join(root: Path, rel_path: str) -> Path:
    """`root / rel_path`, refusing absolute paths, `..`, and symlinks that lead outside `root`."""
    if not isinstance(rel_path, str) or not rel_path.strip() or "\x00" in rel_path:
        raise MountError(f"mount path {rel_path!r} is empty or invalid")
    if "\\" in rel_path:
        raise MountError(f"mount path {rel_path!r}: use '/' as separator")
    pure = PurePosixPath(rel_path)
    if pure.is_absolute() or rel_path.startswith("~"):
        raise MountError(
            f"mount path {rel_path!r} is absolute; it must be relative to the run directory"
        )
    if ".." in pure.parts:
        raise MountError(f"mount path {rel_path!r} escapes the run directory")
    parts = [p for p in pure.parts if p != "."]
    if not parts or rel_path.endswith("/"):
        raise MountError(f"mount path {rel_path!r} names a directory, not a file")
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise MountError(f"mount path {rel_path!r} leads outside the run directory")
    return target


def validate_mounts(root: Path, mounts: object) -> dict[Path, str]:
    """Check every mount before downloading any: a bad job fails fast and writes nothing."""
    if mounts is None:
        return {}
    if not isinstance(mounts, Mapping):
        raise MountError("params.mounted_files must be an object {relative_path: file_id}")
    out: dict[Path, str] = {}
    for rel, file_id in mounts.items():
        if not isinstance(file_id, str) or not file_id:
            raise MountError(f"mount {rel!r}: file id must be a non-empty string")
        out[safe_join(root, rel)] = file_id
    return out


def _download_one(http: SyncHTTP, file_id: str, target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    backoff = Backoff(initial_s=0.5, max_s=5.0)
    for attempt in range(_DOWNLOAD_ATTEMPTS):
        size = 0
        try:
            with open(part, "wb") as f:
                for chunk in http.stream("GET", f"/v1/files/{file_id}/content", timeout_s=120):
                    f.write(chunk)
                    size += len(chunk)
            os.replace(part, target)
            return size
        except (APIConnectionError, InternalServerError) as e:
            if attempt == _DOWNLOAD_ATTEMPTS - 1:
                raise MountError(f"download of {file_id} failed: {e}", infra=True) from e
            logger.warning("download of %s failed (%s); retrying", file_id, e)
            backoff.sleep()
        except APIStatusError as e:
            raise MountError(f"cannot read mounted file {file_id}: {e.message}") from e
        finally:
            part.unlink(missing_ok=True)
    raise AssertionError("unreachable")


def download_mounts(http: SyncHTTP, root: Path, mounts: object) -> int:
    """Download every mounted file into `root`; return the number of bytes written."""
    total = 0
    for target, file_id in validate_mounts(root, mounts).items():
        total += _download_one(http, file_id, target)
    return total
