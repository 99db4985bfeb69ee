"""Custom job kinds: `@register("name") class X(Jobs)`, then `ow.name.create(**params)`.

```python
@register("addition")
class AdditionJob(Jobs):
    mount = {"worker_side.py": "worker_side.py", "lib/": "lib/"}   # local → job working dir
    params = AdditionParams            # a pydantic model
    requires_vram_gb = 0               # default 24
    base_image = "me/image"            # optional: only workers running this image take it

    def get_entrypoint(self, validated_params: AdditionParams) -> str:
        return f"python worker_side.py '{validated_params.model_dump_json()}'"
```

`create()` validates the params, uploads the mounted files the server does not have yet
(content-addressed: unchanged files are never sent again) and submits
`params={"validated_params": ..., "mounted_files": {path: file_id}}`. With an
`AsyncOpenWeights` client the same methods return awaitables.
"""

from __future__ import annotations

import importlib
import keyword
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from openweights._exceptions import OpenWeightsError
from openweights.client._errors import format_validation_error
from openweights.client.files import file_id_of_path
from openweights.client.jobs import PreparedJob, _job_create_params

if TYPE_CHECKING:
    from openweights.client._client import AsyncOpenWeights, OpenWeights

__all__ = ["BUILTIN_KINDS", "Jobs", "expand_mounts", "lookup_kind", "register", "registered_kinds"]

J = TypeVar("J", bound="type[Jobs]")

#: Purpose of uploaded mount files.
MOUNT_PURPOSE = "custom_job_file"
#: Options `create()` takes for the job itself, not for `params` (unless `params` declares them).
JOB_OPTIONS = (
    "requires_vram_gb",
    "allowed_hardware",
    "docker_image",
    "base_image",
    "job_id_suffix",
    "max_attempts",
    "timeout_s",
)
#: Directories never mounted from a directory mount.
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".ipynb_checkpoints",
        "node_modules",
        ".eggs",
    }
)
SKIP_FILES = frozenset({".DS_Store"})
SKIP_SUFFIXES = (".pyc", ".pyo")

#: Client attributes a kind may not shadow.
_RESERVED = frozenset(
    {
        "files",
        "jobs",
        "runs",
        "run",
        "events",
        "tokens",
        "secrets",
        "workers",
        "models",
        "api",
        "chat",
        "settings",
        "base_url",
        "api_key",
        "close",
        "me",
    }
)

#: Built-in kinds, imported on first use (`ow.fine_tuning` imports its module, which registers
#: the kind): attribute → module under `openweights.jobs`. Each module calls `@register(name)`.
BUILTIN_KINDS: dict[str, str] = {
    "fine_tuning": "openweights.jobs.fine_tuning",
    "weighted_sft": "openweights.jobs.weighted_sft",
    "logprob": "openweights.jobs.logprob",
    "inference": "openweights.jobs.inference",
    "inspect_ai": "openweights.jobs.inspect_ai",
}

_REGISTRY: dict[str, type[Jobs]] = {}


def register(name: str) -> Callable[[J], J]:
    """Class decorator: make a `Jobs` subclass available as `ow.<name>` on every client."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"register({name!r}): the name must be a Python identifier.")
    if name.startswith("_") or name in _RESERVED:
        raise ValueError(f"register({name!r}): ow.{name} is taken by the client itself.")

    def decorator(cls: J) -> J:
        if not (isinstance(cls, type) and issubclass(cls, Jobs)):
            raise TypeError(f"@register({name!r}) decorates a subclass of openweights.Jobs.")
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_kinds() -> dict[str, type[Jobs]]:
    """Registered kinds by attribute name (built-ins appear once imported)."""
    return dict(_REGISTRY)


def lookup_kind(name: str) -> type[Jobs] | None:
    """The class behind `ow.<name>`: registered, or a built-in imported now."""
    cls = _REGISTRY.get(name)
    if cls is None and name in BUILTIN_KINDS:
        importlib.import_module(BUILTIN_KINDS[name])
        cls = _REGISTRY.get(name)
    return cls


class _AnyParams(BaseModel):
    """Params of a kind that declares no model: whatever was given."""

    model_config = ConfigDict(extra="allow")


def _default_id_prefix(cls: type) -> str:
    prefix = re.sub(r"[^a-z0-9_]", "_", cls.__name__.lower()).lstrip("_0123456789")
    return prefix[:32] or "job"


class Jobs:
    """Base class of a job kind; `ow.<name>` is an instance bound to the client `ow`."""

    #: `{local path: path in the job's working directory}`; a directory (or a path ending
    #: with '/') mounts everything in it.
    mount: ClassVar[dict[str, str]] = {}
    #: Pydantic model the keyword arguments of `create()` are validated with.
    params: ClassVar[type[BaseModel] | None] = None
    #: VRAM a worker needs; overridable per job: `create(requires_vram_gb=60)`.
    requires_vram_gb: ClassVar[float] = 24
    #: Docker image the job runs in (sent as `docker_image`); None: any worker.
    base_image: ClassVar[str | None] = None
    #: Readable start of job ids; default: the lower-cased class name.
    id_prefix: ClassVar[str | None] = None
    #: `type` of the submitted jobs.
    type: ClassVar[str] = "custom"

    def __init__(self, client: OpenWeights | AsyncOpenWeights) -> None:
        self._client = client

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind of {self._client!r}>"

    # -------------------------------------------------------- what a kind defines

    def get_entrypoint(self, validated_params: BaseModel) -> str:
        """The shell command the worker runs in the job's working directory."""
        raise NotImplementedError(f"{type(self).__name__} must define get_entrypoint()")

    @property
    def _id_prefix(self) -> str:
        return self.id_prefix or _default_id_prefix(type(self))

    # -------------------------------------------------------- building the request (no I/O)

    def validate_params(self, **params: Any) -> BaseModel:
        """Validate `create()`'s keyword arguments; `InvalidParamsError` names each bad field."""
        model = self.params or _AnyParams
        try:
            return model(**params)
        except ValidationError as e:
            raise format_validation_error(f"{type(self).__name__}", e) from None

    def prepare(self, **kwargs: Any) -> PreparedJob:
        """Validate, hash the mounted files and build the request, without network I/O."""
        fields = set((self.params or _AnyParams).model_fields)
        options = {k: kwargs.pop(k) for k in JOB_OPTIONS if k in kwargs and k not in fields}
        validated = self.validate_params(**kwargs)
        for k in JOB_OPTIONS:
            # A params model may declare an option itself (fine-tuning has job_id_suffix).
            if k in fields and getattr(validated, k, None) is not None:
                options.setdefault(k, getattr(validated, k))

        mounts = expand_mounts(self.mount)
        mounted_files: dict[str, str] = {}
        uploads: dict[str, Path] = {}
        for remote, local in mounts.items():
            fid = file_id_of_path(MOUNT_PURPOSE, local)
            mounted_files[remote] = fid
            uploads.setdefault(fid, local)

        model = getattr(validated, "model", None)
        request = _job_create_params(
            type=self.type,
            id_prefix=self._id_prefix,
            params={
                "validated_params": validated.model_dump(mode="json"),
                "mounted_files": mounted_files,
            },
            script=self.get_entrypoint(validated),
            model=model if isinstance(model, str) else None,
            requires_vram_gb=options.get("requires_vram_gb", self.requires_vram_gb),
            allowed_hardware=options.get("allowed_hardware"),
            docker_image=options.get("docker_image")
            or options.get("base_image")
            or self.base_image,
            job_id_suffix=options.get("job_id_suffix"),
            max_attempts=options.get("max_attempts"),
            timeout_s=options.get("timeout_s"),
        )
        return PreparedJob(request=request, uploads=uploads)

    # -------------------------------------------------------- verbs (sync or awaitable)

    def create(self, **params: Any) -> Any:
        """Validate, upload what changed, submit; returns the `Job` (awaitable on async clients).

        Besides the kind's params: `requires_vram_gb`, `allowed_hardware`, `docker_image`,
        `job_id_suffix` (forces a distinct job), `max_attempts`, `timeout_s`.
        """
        return self._client.jobs._submit(self.prepare(**params))

    def list(self, *, status: str | None = None, limit: int = 100) -> Any:
        """This kind's jobs, newest first."""
        return self._client.jobs.list(
            status=status, type=self.type, limit=limit, id_prefix=self._id_prefix
        )

    def retrieve(self, job_id: str) -> Any:
        return self._client.jobs.retrieve(job_id)

    def find(self, *, status: str | None = None, limit: int = 100, **params: Any) -> Any:
        """This kind's jobs whose validated params contain these values."""
        return self._client.jobs.find(
            type=self.type, status=status, limit=limit, id_prefix=self._id_prefix, **params
        )

    def cancel(self, job_id: str) -> Any:
        return self._client.jobs.cancel(job_id)

    def restart(self, job_id: str) -> Any:
        return self._client.jobs.restart(job_id)

    def wait(
        self, job_id: str, *, timeout_s: float | None = None, raise_on_failure: bool = False
    ) -> Any:
        return self._client.jobs.wait(
            job_id, timeout_s=timeout_s, raise_on_failure=raise_on_failure
        )


def _remote_path(remote: str) -> PurePosixPath:
    path = PurePosixPath(remote.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise OpenWeightsError(
            f"Mount target {remote!r} must be a relative path inside the job's working directory."
        )
    return path


def _skip_dir(path: Path) -> bool:
    return path.name in SKIP_DIRS or (path / "pyvenv.cfg").exists()  # any virtualenv


def expand_mounts(mount: dict[str, str]) -> dict[str, Path]:
    """`{local: remote}` → `{remote file path: local file}`, directories walked."""
    out: dict[str, Path] = {}

    def add(remote: PurePosixPath, local: Path) -> None:
        key = remote.as_posix()
        if key in ("", "."):
            raise OpenWeightsError(f"Mount of {str(local)!r} needs a file name as target.")
        if key in out and out[key] != local:
            raise OpenWeightsError(f"Two mounts write {key!r}: {out[key]} and {local}.")
        out[key] = local

    for local_str, remote_str in mount.items():
        local = Path(os.path.expanduser(local_str))
        remote = _remote_path(remote_str)
        if local.is_dir():
            for root, dirs, files in os.walk(local):
                dirs[:] = sorted(d for d in dirs if not _skip_dir(Path(root) / d))
                for name in sorted(files):
                    if name in SKIP_FILES or name.endswith(SKIP_SUFFIXES):
                        continue
                    rel = Path(root, name).relative_to(local)
                    add(remote.joinpath(*rel.parts), Path(root, name))
        elif local.is_file():
            if local_str.endswith(("/", os.sep)):
                raise OpenWeightsError(f"Mount source {local_str!r} ends with '/' but is a file.")
            if remote_str.endswith("/") or remote_str in ("", "."):
                remote = remote / local.name
            add(remote, local)
        else:
            raise OpenWeightsError(
                f"Mount source {local_str!r} does not exist (relative paths start at {os.getcwd()})."
            )
    return out
