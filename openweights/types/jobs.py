from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["pending", "in_progress", "completed", "failed", "canceled"]
TERMINAL_STATUSES: tuple[str, ...] = ("completed", "failed", "canceled")


#: a job id's readable prefix (`ftjob`, a custom job's kind)
ID_PREFIX_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"


class JobCreateParams(BaseModel):
    """What a client submits. The server derives the id from `type`, `params` and `script`."""

    model_config = {"extra": "forbid", "strict": True}

    type: str = Field(pattern=r"^[a-z][a-z0-9_\-]{0,63}$", description="Job kind, e.g. `custom`.")
    id_prefix: str = Field(
        default="job",
        pattern=ID_PREFIX_PATTERN,
        description="Readable id prefix (`ftjob`).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="`{validated_params: {...}, mounted_files: {path: file_id}}` by convention.",
    )
    script: str = Field(
        min_length=1, max_length=100_000, description="Shell command run on the worker."
    )
    model: str | None = Field(default=None, description="Model the job loads (for cache affinity).")
    requires_vram_gb: float = Field(default=0, ge=0, le=100_000)
    allowed_hardware: list[str] | None = Field(
        default=None, description='e.g. `["1x H200", "2x A100"]`; None: any with enough VRAM.'
    )
    docker_image: str | None = Field(default=None, max_length=500)
    job_id_suffix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    timeout_s: float | None = Field(default=None, gt=0, description="Runtime limit per attempt.")


class JobObject(BaseModel):
    id: str
    object: Literal["job"] = "job"
    type: str
    status: JobStatus
    params: dict[str, Any]
    script: str
    model: str | None = None
    requires_vram_gb: float = 0
    allowed_hardware: list[str] | None = None
    docker_image: str | None = None
    outputs: dict[str, Any] | None = None
    attempts: int = 0
    max_attempts: int = 3
    timeout_s: float | None = None
    error: str | None = Field(default=None, description="Why the job failed.")
    pending_reason: str | None = Field(default=None, description="Why a pending job still waits.")
    worker_id: str | None = None
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None


class JobFindParams(BaseModel):
    """`ow.jobs.find(**params)`: jobs whose `params.validated_params` contain these values."""

    model_config = {"strict": True}

    params: dict[str, Any] = Field(default_factory=dict)
    type: str | None = None
    status: JobStatus | None = None
    id_prefix: str | None = Field(
        default=None,
        pattern=ID_PREFIX_PATTERN,
        description="Only jobs whose id starts with `{id_prefix}-` (one kind of custom job).",
    )
    limit: int = Field(default=100, ge=1, le=1000)
