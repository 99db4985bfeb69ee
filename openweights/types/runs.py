from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from openweights.types.jobs import JobObject

RunStatus = Literal["in_progress", "completed", "failed", "canceled", "lost"]


class RunObject(BaseModel):
    id: int
    object: Literal["run"] = "run"
    job_id: str
    worker_id: str | None = None
    attempt: int
    status: RunStatus
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    log_file: str | None = Field(
        default=None, description="File id of the whole log, once the run ended."
    )
    hardware: str | None = None


class EventCreate(BaseModel):
    data: dict[str, Any]
    file: str | None = None


class EventsCreate(BaseModel):
    model_config = {"strict": True}

    events: list[EventCreate] = Field(min_length=1, max_length=10_000)


class EventObject(BaseModel):
    id: int
    object: Literal["event"] = "event"
    run_id: int
    job_id: str
    data: dict[str, Any]
    file: str | None = None
    created_at: float


class Hardware(BaseModel):
    model_config = {"strict": True}

    gpu_type: str | None = Field(default=None, description="e.g. `H100`; None on a CPU worker.")
    gpu_count: int = 0
    vram_gb: float = Field(default=0, description="Total VRAM over all GPUs.")
    hardware_type: str = Field(
        default="cpu", description='What `allowed_hardware` matches: "1x H100".'
    )
    cpu_count: int = 1
    memory_gb: float = 0


class WorkerRegister(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    name: str = Field(default="worker", max_length=200)
    hardware: Hardware = Field(default_factory=Hardware)
    docker_image: str | None = Field(
        default=None, description="Image this worker runs; None: it takes jobs of any image."
    )
    any_hardware: bool = Field(
        default=False,
        description="Take every job of the org whatever it requires (the embedded CPU pool).",
    )
    cached_models: list[str] = Field(default_factory=list)
    provider: str = "local"


class WorkerObject(BaseModel):
    id: str
    object: Literal["worker"] = "worker"
    name: str
    status: Literal["active", "shutdown", "offline"]
    hardware: Hardware
    docker_image: str | None = None
    any_hardware: bool = False
    cached_models: list[str] = Field(default_factory=list)
    provider: str = "local"
    current_run_id: int | None = None
    last_seen_at: float
    created_at: float
    token: str | None = Field(default=None, description="Only on register: the worker's own token.")


class RunCompleteRequest(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    status: Literal["completed", "failed", "canceled", "lost"]
    exit_code: int | None = None
    error: str | None = Field(default=None, max_length=10_000)


class RunDone(RunCompleteRequest):
    """A run's completion carried by the worker's next claim (`ClaimRequest.done`)."""

    run_id: int = Field(ge=1, le=2**63 - 1, description="The run this completes.")


class ClaimRequest(BaseModel):
    model_config = {"strict": True}

    wait_s: float = Field(default=30.0, ge=0, le=300, description="Long-poll up to this long.")
    done: RunDone | None = Field(
        default=None,
        description=(
            "The final word on this worker's previous run, exactly as `POST /v1/runs/{id}/complete` "
            "takes it, recorded before the claim: one round trip per job instead of two. When it "
            "is refused, the error names `done` and no job is claimed."
        ),
    )


class ClaimResponse(BaseModel):
    run: RunObject
    job: JobObject
    token: str = Field(description="Run-scoped token the job uses as OPENWEIGHTS_API_KEY.")
    env: dict[str, str] = Field(description="The org's secrets, for the job's environment.")
    lease_s: float


class HeartbeatRequest(BaseModel):
    model_config = {"strict": True}

    wait_s: float = Field(default=10.0, ge=0, le=120, description="Return early on cancel.")


class HeartbeatResponse(BaseModel):
    cancel: bool
    lease_expires_at: float
