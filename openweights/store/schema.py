"""The database schema, as SQLAlchemy Core tables. Changes go through Alembic migrations only
(`store/migrations/versions/`); a test checks the migrations produce exactly this schema."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

#: JSON on SQLite, JSONB on PostgreSQL (containment queries for `jobs.find`).
Json = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
#: Autoincrementing 64-bit ids that also work as SQLite's rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")

orgs = Table(
    "orgs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("kind", String(16), nullable=False),  # user | worker | run
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("run_id", BigId, nullable=True),  # for run tokens
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    # every completion revokes its run's token by run id: without it, a table scan per run
    Index("ix_tokens_run", "run_id"),
)

secrets = Table(
    "secrets",
    metadata,
    Column("org_id", String(64), ForeignKey("orgs.id"), primary_key=True),
    Column("name", String(200), primary_key=True),
    Column("value_encrypted", LargeBinary, nullable=False),
    Column("updated_at", Float, nullable=False),
)

files = Table(
    "files",
    metadata,
    Column("org_id", String(64), ForeignKey("orgs.id"), primary_key=True),
    Column("id", String(128), primary_key=True),
    Column("filename", String(500), nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),  # blob key: identical content is stored once
    Column("created_at", Float, nullable=False),
    Index("ix_files_org_created", "org_id", "created_at"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("pk", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False),
    Column("id", String(200), nullable=False),
    Column("type", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("params", Json, nullable=False),
    Column("script", Text, nullable=False),
    Column("model", String(500), nullable=True),
    Column("requires_vram_gb", Float, nullable=False, default=0),
    Column("allowed_hardware", Json, nullable=True),
    Column("docker_image", String(500), nullable=True),
    Column("outputs", Json, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("timeout_s", Float, nullable=True),
    Column("error", Text, nullable=True),
    Column("current_run_id", BigId, nullable=True),
    Column("worker_id", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("queued_at", Float, nullable=False),  # claim order: oldest first
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    UniqueConstraint("org_id", "id", name="uq_jobs_org_id"),
    Index("ix_jobs_claim", "org_id", "status", "queued_at", "pk"),
    Index("ix_jobs_org_created", "org_id", "created_at"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False),
    Column("job_pk", BigId, ForeignKey("jobs.pk"), nullable=False),
    Column("worker_id", String(64), nullable=True),
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # in_progress completed failed canceled lost
    Column("lease_expires_at", Float, nullable=True),
    Column("started_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    Column("exit_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("log_size", BigInteger, nullable=False, default=0),
    Column("log_file", String(128), nullable=True),
    Column("hardware", String(64), nullable=True),
    Index("ix_runs_job", "job_pk"),
    Index("ix_runs_lease", "status", "lease_expires_at"),
)

log_chunks = Table(
    "log_chunks",
    metadata,
    Column("run_id", BigId, ForeignKey("runs.id"), primary_key=True),
    Column("offset", BigInteger, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False),
    Column("run_id", BigId, ForeignKey("runs.id"), nullable=False),
    Column("job_pk", BigId, ForeignKey("jobs.pk"), nullable=False),
    Column("data", Json, nullable=False),
    Column("file", String(128), nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ix_events_run", "run_id", "id"),
    Index("ix_events_job", "job_pk", "id"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("org_id", String(64), ForeignKey("orgs.id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # active | shutdown
    Column("hardware", Json, nullable=False),
    Column("hardware_type", String(64), nullable=False),
    Column("vram_gb", Float, nullable=False),
    Column("docker_image", String(500), nullable=True),
    Column("any_hardware", Boolean, nullable=False, default=False),
    Column("cached_models", Json, nullable=False),
    Column("provider", String(64), nullable=False),
    Column("token_id", String(64), nullable=True),
    Column("current_run_id", BigId, nullable=True),
    Column("last_seen_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_workers_org", "org_id", "status"),
)

models = Table(
    # Models that jobs produced (`finetuned_model_id`), registered when their run completes:
    # `files` maps a path under the model's root (`config.json`, `checkpoint-10/adapter_model.safetensors`)
    # to the file that holds it, so a worker rebuilds the directory from openweights' own storage.
    "models",
    metadata,
    Column("org_id", String(64), ForeignKey("orgs.id"), primary_key=True),
    Column("name", String(500), primary_key=True),
    Column("kind", String(16), nullable=False),  # full | adapter
    Column("base_model", String(500), nullable=True),
    Column("job_id", String(200), nullable=True),
    Column("run_id", BigId, nullable=True),
    Column("files", Json, nullable=False),
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_models_org_updated", "org_id", "updated_at"),
)

cluster_pods = Table(
    # Every pod a cluster manager launched, as billed by its provider: launch to termination,
    # boot and idle time included (runs only cover busy time). Written by the manager through
    # `/v1/cluster/pods`; a restarted manager fills in what it missed from the provider's list.
    "cluster_pods",
    metadata,
    Column("org_id", String(64), ForeignKey("orgs.id"), primary_key=True),
    Column("provider", String(64), primary_key=True),
    Column("pod_id", String(200), primary_key=True),
    Column("name", String(200), nullable=False),  # also its worker's name
    Column("hardware_type", String(64), nullable=False),
    Column("price_per_hour", Float, nullable=False),
    Column("image", String(500), nullable=True),
    Column("token_id", String(64), nullable=True),  # the pod's own worker token
    Column("job_id", String(200), nullable=True),  # the job it was launched for
    Column("worker_id", String(64), nullable=True),
    Column("launched_at", Float, nullable=False),
    Column("registered_at", Float, nullable=True),
    Column("terminated_at", Float, nullable=True),
    Column("termination_reason", Text, nullable=True),
    Index("ix_cluster_pods_org_launched", "org_id", "launched_at"),
    Index("ix_cluster_pods_org_name", "org_id", "name"),
)

cluster_waits = Table(
    # Why the cluster manager starts no pod for a pending job (spend cap, cooldown, no hardware,
    # max workers, a pod booting for it): the manager replaces its org's rows each step, and a
    # job's `pending_reason` shows the row until `expires_at` (a manager that died says nothing).
    "cluster_waits",
    metadata,
    Column("org_id", String(64), ForeignKey("orgs.id"), primary_key=True),
    Column("job_id", String(200), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)
