"""PostgreSQL: a worker's claim, with the completion it carries, as one function call.

The claim route's common case — complete the worker's last run (no log to store), check the
worker in, take the oldest fitting pending job, start it, mint its run token — is ~16 statements
over ~7 round trips when the server sends them one by one; PostgreSQL's own CPU for them (parse,
bind, execute of each) and psycopg's client side were most of a job's cost. `ow_claim_v1`
(migration 0005) runs the same statements inside the database: one round trip, one statement.
It covers only that common case and raises SQLSTATE `OWFB0` for anything else (a run with a log,
a resend, a refused caller, a shut-down worker, a run that declared a model...): the transaction
is rolled back with nothing written and `routes/runs.claim_loop` runs the Python path, which
then answers exactly as before. `OPENWEIGHTS_PG_CLAIM_FUNCTION=0` turns it off (the Python path
for every claim; the benchmark and tests compare both).
"""

from __future__ import annotations

import logging
import os
import secrets as _secrets
from typing import Any

from openweights.store import files as fstore
from openweights.store.jobs import Claim
from openweights.store.orgs import TOKEN_PREFIX, Principal, hash_token, new_id
from openweights.types.runs import RunDone

log = logging.getLogger(__name__)

FALLBACK_SQLSTATE = "OWFB0"
SQL = (
    "SELECT ow_claim_v1(%(org)s, %(worker)s, %(kind)s, %(token)s, %(lease_s)s, %(done_run)s, "
    "%(done_status)s, %(done_exit)s, %(done_error)s, %(log_file)s, %(log_sha)s, %(token_id)s, "
    "%(token_hash)s, %(token_prefix)s)"
)
#: job columns that are floats (JSON gives whole numbers back as ints)
_FLOATS = (
    "requires_vram_gb", "timeout_s", "created_at", "updated_at", "queued_at", "started_at",
    "finished_at",
)  # fmt: skip


class Fallback(Exception):
    """Not the common case (or no function): run the Python path. Nothing was written."""


class PgClaim:
    """Calls `ow_claim_v1` on the hot routes' PostgreSQL connections (`queries.RawDatabase`)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.enabled = os.environ.get("OPENWEIGHTS_PG_CLAIM_FUNCTION", "1") != "0"
        self.calls = 0
        self.fallbacks = 0

    def call(
        self, p: Principal, worker_id: str, lease_s: float, done: RunDone | None, log_sha: str
    ) -> tuple[dict | None, Claim | None]:
        """In one transaction: complete `done` (if any), check the worker in, claim. Returns
        (the completed run's keys to wake here, or None; the claim, or None when no job fits).
        Raises `Fallback` when the Python path must answer instead."""
        import psycopg

        secret = TOKEN_PREFIX + _secrets.token_urlsafe(32)
        params = {
            "org": p.org_id,
            "worker": worker_id,
            "kind": p.kind,
            "token": p.token_id,
            "lease_s": float(lease_s),
            "done_run": done.run_id if done is not None else None,
            "done_status": done.status if done is not None else None,
            "done_exit": done.exit_code if done is not None else None,
            "done_error": done.error if done is not None else None,
            "log_file": fstore.file_id("log", log_sha),
            "log_sha": log_sha,
            "token_id": new_id("tok"),
            "token_hash": hash_token(secret),
            "token_prefix": secret[:10],
        }
        self.calls += 1
        try:
            out = self.raw.call_once(SQL, params)
        except psycopg.Error as e:
            self.fallbacks += 1
            if e.sqlstate == FALLBACK_SQLSTATE:
                raise Fallback(str(e)) from None
            if isinstance(e, psycopg.errors.UndefinedFunction):
                log.warning("ow_claim_v1 is missing (migration 0005 not applied): claims use "
                            "the Python path")  # fmt: skip
                self.enabled = False
            raise Fallback(f"{type(e).__name__}: {e}") from None
        now = out["now"]
        completed = None
        if done is not None:
            completed = {"run_id": done.run_id, "job_id": out["done_job_id"]}
        if "run_id" not in out:
            return completed, None
        job = out["job"]
        for k in _FLOATS:
            if job.get(k) is not None:
                job[k] = float(job[k])
        run_id = out["run_id"]
        run = {
            "id": run_id,
            "org_id": p.org_id,
            "job_pk": job["pk"],
            "job_id": job["id"],
            "worker_id": worker_id,
            "attempt": out["attempt"],
            "status": "in_progress",
            "lease_expires_at": now + lease_s,
            "started_at": now,
            "finished_at": None,
            "exit_code": None,
            "error": None,
            "log_size": 0,
            "log_file": None,
            "hardware": out["hardware"],
        }
        return completed, Claim(run=run, job=job, token=secret)


def pg_claim(state: Any, hot: Any) -> PgClaim | None:
    """The server's `PgClaim` (made on first use); None on SQLite or when it is turned off."""
    if hot.sqlite:
        return None
    pc = getattr(state, "pg_claim", None)
    if pc is None:
        pc = state.pg_claim = PgClaim(hot.raw)
    return pc if pc.enabled else None
