"""Wire models of the cluster manager's routes (`/v1/cluster/...`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

#: Org secrets the manager may read back (`POST /v1/cluster/secrets`): provider keys and limits.
#: Nothing else: a user token cannot read other secret values through this route.
CLUSTER_SECRET_NAMES: tuple[str, ...] = (
    "RUNPOD_API_KEY",
    "OW_MAX_WORKERS",
    "OW_MAX_SPEND_PER_HOUR",
    "OW_IDLE_S",
)
#: Org secrets never put in a job's environment: the manager's own.
JOB_HIDDEN_SECRETS: frozenset[str] = frozenset(CLUSTER_SECRET_NAMES) | {"OW_MANAGED"}


class ClusterStateRequest(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    wait_s: float = Field(default=0, ge=0, le=60, description="Long-poll up to this long.")
    version: str | None = Field(
        default=None, description="Answer at once when the state's version differs from this."
    )


class PendingJob(BaseModel):
    id: str
    requires_vram_gb: float = 0
    allowed_hardware: list[str] | None = None
    docker_image: str | None = None
    model: str | None = None
    queued_at: float


class ClusterWorker(BaseModel):
    id: str
    name: str
    status: str
    hardware_type: str
    vram_gb: float
    docker_image: str | None = None
    any_hardware: bool = False
    cached_models: list[str] = Field(default_factory=list)
    provider: str
    current_run_id: int | None = None
    last_seen_at: float
    created_at: float
    idle_since: float = Field(description="When its last run ended (or it registered).")


class ClusterState(BaseModel):
    object: Literal["cluster.state"] = "cluster.state"
    version: str
    now: float = Field(description="The server's clock.")
    pending: list[PendingJob]
    pending_total: int
    workers: list[ClusterWorker]


class LeaseRequest(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    holder: str = Field(min_length=1, max_length=200)
    ttl_s: float = Field(default=30, gt=0, le=3600)


class LeaseObject(BaseModel):
    object: Literal["cluster.lease"] = "cluster.lease"
    held: bool
    holder: str
    expires_at: float


class LoseWorkerRequest(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    reason: str = Field(default="its pod was terminated", max_length=2000)


class LostJob(BaseModel):
    id: str
    status: str
    run_id: int


class LoseWorkerResponse(BaseModel):
    worker_id: str
    jobs: list[LostJob]


class ClusterSecretsRequest(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    names: list[str] = Field(min_length=1, max_length=len(CLUSTER_SECRET_NAMES))


class ClusterSecrets(BaseModel):
    values: dict[str, str]


class RunCost(BaseModel):
    run_id: int
    job_id: str
    status: str
    hardware_type: str | None = None
    provider: str
    started_at: float
    finished_at: float | None = None
    price_per_hour: float
    cost_usd: float
    pod_id: str | None = Field(default=None, description="The pod it ran on, if a manager's.")


class CostReport(BaseModel):
    object: Literal["cluster.costs"] = "cluster.costs"
    runs: list[RunCost]
    by_job: dict[str, float]
    by_day: dict[str, float] = Field(description="UTC day (YYYY-MM-DD of the run's start) → USD.")
    total_usd: float = Field(description="Busy time: the runs' cost.")
    billed_usd: float = Field(
        default=0.0,
        description="Pod time as the provider bills it (launch to termination, boot and idle "
        "included), of the pods in `/v1/cluster/pods`, over the same window.",
    )
    billed_by_day: dict[str, float] = Field(
        default_factory=dict, description="UTC day of the pod's launch → billed USD."
    )
    note: str = (
        "total_usd: runs' busy time × the price of their pod (recorded at launch; else the "
        "catalog's). billed_usd: pod time from launch to termination, boot and idle included."
    )


class PodRecordRequest(BaseModel):
    """What a manager reports about one of its pods (`POST /v1/cluster/pods`): at launch, when
    its worker registers, when it is terminated. Repeating a report changes nothing."""

    model_config = {"extra": "forbid", "strict": True}

    provider: str = Field(min_length=1, max_length=64)
    pod_id: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=200)
    hardware_type: str = Field(max_length=64)
    price_per_hour: float = Field(ge=0, le=100_000)
    image: str | None = Field(default=None, max_length=500)
    token_id: str | None = Field(default=None, max_length=64)
    job_id: str | None = Field(default=None, max_length=200)
    worker_id: str | None = Field(default=None, max_length=64)
    launched_at: float | None = Field(
        default=None,
        ge=0,
        le=1e11,
        description="When the provider started it (epoch s); default: now (server clock).",
    )
    registered_at: float | None = Field(default=None, ge=0, le=1e11)
    terminated: bool = False
    termination_reason: str | None = Field(default=None, max_length=2000)


class ClusterPod(BaseModel):
    object: Literal["cluster.pod"] = "cluster.pod"
    provider: str
    pod_id: str
    name: str
    hardware_type: str
    price_per_hour: float
    image: str | None = None
    token_id: str | None = None
    job_id: str | None = Field(default=None, description="The job it was launched for.")
    worker_id: str | None = None
    launched_at: float
    registered_at: float | None = None
    terminated_at: float | None = None
    termination_reason: str | None = None
    billed_s: float = Field(default=0.0, description="Launch (or `since`) to termination or now.")
    cost_usd: float = 0.0


class ClusterPodList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ClusterPod]
    billed_usd: float


class WaitsRequest(BaseModel):
    """The manager's reason each pending job waits; replaces the org's previous reasons."""

    model_config = {"extra": "forbid", "strict": True}

    reasons: dict[
        Annotated[str, StringConstraints(min_length=1, max_length=200)],
        Annotated[str, StringConstraints(max_length=2000)],
    ] = Field(max_length=10_000, description="job id → why no pod runs it yet.")
    ttl_s: float = Field(default=60, gt=0, le=3600, description="Shown for this long.")


class WaitsResponse(BaseModel):
    object: Literal["cluster.waits"] = "cluster.waits"
    count: int
    reasons: dict[str, str] | None = Field(default=None, description="job id → why (GET only).")


class EstimateRequest(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    requires_vram_gb: float = Field(default=0, ge=0, le=100_000)
    allowed_hardware: list[str] | None = None
    docker_image: str | None = None
    job_id: str | None = Field(
        default=None,
        description="A job already created: its own requirements and the jobs queued before it.",
    )


class Estimate(BaseModel):
    object: Literal["cluster.estimate"] = "cluster.estimate"
    hardware_type: str | None = Field(description="Cheapest catalog shape that fits; None: none.")
    price_per_hour: float | None = None
    idle_workers: int = Field(description="Live idle workers that would take the job now.")
    busy_workers: int = Field(description="Live busy workers that fit it.")
    jobs_ahead: int = Field(description="Pending jobs of the org queued before it.")
    estimated_wait_s: float | None = Field(
        description="0 with an idle worker; the pod boot time when none fits (the median of the "
        "org's recent pods of that hardware, else a typical 300 s); None when it waits for busy "
        "workers (their jobs' ends are unknown) or can never start."
    )
    boot_s_observed: float | None = Field(
        default=None, description="Median launch-to-registration of the org's recent such pods."
    )
    manager_reason: str | None = Field(
        default=None, description="Why the org's cluster manager starts no pod for the job now."
    )
    message: str
