"""Rows → wire models."""

from __future__ import annotations

from openweights import types as t


def job(row: dict, pending_reason: str | None = None) -> t.JobObject:
    return t.JobObject(
        id=row["id"],
        type=row["type"],
        status=row["status"],
        params=row["params"] or {},
        script=row["script"],
        model=row["model"],
        requires_vram_gb=row["requires_vram_gb"] or 0,
        allowed_hardware=row["allowed_hardware"],
        docker_image=row["docker_image"],
        outputs=row["outputs"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        timeout_s=row["timeout_s"],
        error=row["error"],
        pending_reason=pending_reason,
        worker_id=row["worker_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def run(row: dict) -> t.RunObject:
    return t.RunObject(
        id=row["id"],
        job_id=row["job_id"],
        worker_id=row["worker_id"],
        attempt=row["attempt"],
        status=row["status"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        exit_code=row["exit_code"],
        error=row["error"],
        log_file=row["log_file"],
        hardware=row["hardware"],
    )


def file(row: dict) -> t.FileObject:
    return t.FileObject(
        id=row["id"],
        filename=row["filename"],
        purpose=row["purpose"],
        bytes=row["bytes"],
        sha256=row["sha256"],
        created_at=row["created_at"],
    )


def token(row: dict, secret: str | None = None) -> t.TokenObject:
    return t.TokenObject(
        id=row["id"],
        name=row["name"],
        kind=row["kind"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        token=secret,
    )


def worker(row: dict, now: float, offline_s: float, token: str | None = None) -> t.WorkerObject:
    status = row["status"]
    if status == "active" and row["last_seen_at"] < now - offline_s:
        status = "offline"
    return t.WorkerObject(
        id=row["id"],
        name=row["name"],
        status=status,
        hardware=t.Hardware(**row["hardware"]),
        docker_image=row["docker_image"],
        any_hardware=row["any_hardware"],
        cached_models=row["cached_models"] or [],
        provider=row["provider"],
        current_run_id=row["current_run_id"],
        last_seen_at=row["last_seen_at"],
        created_at=row["created_at"],
        token=token,
    )


def event(row: dict) -> t.EventObject:
    return t.EventObject(
        id=row["id"],
        run_id=row["run_id"],
        job_id=row["job_id"],
        data=row["data"],
        file=row["file"],
        created_at=row["created_at"],
    )
