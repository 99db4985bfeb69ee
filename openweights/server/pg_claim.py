"""PostgreSQL: a worker's claim, with the completion it carries, as one function call.

The claim route's common case — complete the worker's last run (no log to store), check the
worker in, take the oldest fitting pending job, start it, mint its run token — is ~16 statements
over ~7 round trips when the server sends them one by one; PostgreSQL's own CPU for them (parse,
bind, execute of each) and psycopg's client side were most of a job's cost. `ow_claim_v1`
(migration 0005) runs the same statements inside the database: one round trip, one statement.
It covers only that common case and raises SQLSTATE `OWFB0` for anything else (a run with a log,
a resend, a refused caller, a shut-down worker, a run that declared a model...): what it did is
rolled back, nothing of it written, and `routes/runs.claim_loop` runs the Python path, which
then answers exactly as before. Claims that arrive together go in one call of
`ow_claim_batch_v1` (migration 0006): each in its own subtransaction, so that one that falls
back is rolled back alone. `OPENWEIGHTS_PG_CLAIM_FUNCTION=0` turns it off (the Python path
for every claim; the benchmark and tests compare both).
"""

from __future__ import annotations

import asyncio
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
BATCH_SQL = "SELECT ow_claim_batch_v1(%(items)s)"
#: a lone claim: the function itself, without the batch's array and subtransaction (70 us less of
#: a 470 us call in-process); if it raises, its statement is rolled back whole, which is the claim
ONE_SQL = (
    "SELECT ow_claim_v1(%(org)s, %(worker)s, %(kind)s, %(token)s, %(lease_s)s, %(done_run)s, "
    "%(done_status)s, %(done_exit)s, %(done_error)s, %(log_file)s, %(log_sha)s, %(token_id)s, "
    "%(token_hash)s, %(token_prefix)s)"
)
#: claims sent in one call at most (each is a subtransaction of the batch's transaction)
MAX_BATCH = 32
#: job columns that are floats (JSON gives whole numbers back as ints)
_FLOATS = (
    "requires_vram_gb", "timeout_s", "created_at", "updated_at", "queued_at", "started_at",
    "finished_at",
)  # fmt: skip


class Fallback(Exception):
    """Not the common case (or no function): run the Python path. Nothing was written."""


class PgClaim:
    """Calls the claim function on a connection of its own. One call is in the database at a
    time: the claims that arrive meanwhile wait and go together in the next call of
    `ow_claim_batch_v1` (up to `MAX_BATCH`); a lone claim goes at once, as one call of
    `ow_claim_v1`. Under load a batch costs one round trip and one commit."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self._conn: Any = None  # psycopg.AsyncConnection, made on first use
        self.enabled = os.environ.get("OPENWEIGHTS_PG_CLAIM_FUNCTION", "1") != "0"
        self.calls = 0  # claims sent
        self.batches = 0  # function calls
        self.fallbacks = 0
        self._queue: list[tuple[dict, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None  # sends the waiting claims, one call at a time

    async def call(
        self, p: Principal, worker_id: str, lease_s: float, done: RunDone | None, log_sha: str
    ) -> tuple[dict | None, Claim | None]:
        """In one transaction: complete `done` (if any), check the worker in, claim. Returns
        (the completed run's keys to wake here, or None; the claim, or None when no job fits).
        Raises `Fallback` when the Python path must answer instead."""
        secret = TOKEN_PREFIX + _secrets.token_urlsafe(32)
        item = {
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
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if self._sender is None:  # nothing in the database: this claim goes at once
            # (from a task: a request that is canceled cannot cut a batch short)
            self._sender = asyncio.create_task(self._send())
        out = await fut
        if "error" in out:
            self.fallbacks += 1
            if out["error"] != FALLBACK_SQLSTATE:
                log.debug("ow_claim_v1 raised %s (%s): the Python path answers",
                          out["error"], out.get("message"))  # fmt: skip
            raise Fallback(out.get("message", ""))
        return self._result(out, p, worker_id, lease_s, done, secret)

    async def _send(self) -> None:
        """Sends the waiting claims, a batch per call, until none waits."""
        try:
            while self._queue:
                await self._send_batch()
        finally:
            self._sender = None

    async def _send_batch(self) -> None:
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        try:
            outs = await self._call_many([item for item, _ in batch])
        except Exception as e:  # the whole call failed: every claim of it falls back
            out = {"error": getattr(e, "sqlstate", None) or "", "message": str(e)}
            outs = [out] * len(batch)
        for (_, fut), out in zip(batch, outs, strict=True):
            if not fut.done():
                fut.set_result(out)

    async def _call_many(self, items: list[dict]) -> list[dict]:
        """One call of the claim function (`ow_claim_v1` for one claim, `ow_claim_batch_v1` for
        several), a transaction of its own, in one round trip, on this server's claim
        connection: an asyncio one, on the event loop (one call at a time uses it: no thread
        hop, no pool)."""
        import psycopg
        from psycopg.types.json import Jsonb

        self.calls += len(items)
        self.batches += 1
        c = self._conn
        if c is None or c.closed:
            # autocommit: the call is a transaction of its own (no BEGIN, no COMMIT to send)
            c = self._conn = await psycopg.AsyncConnection.connect(self.raw.dsn, autocommit=True)
            self.raw.own_pids.add(c.info.backend_pid)  # its NOTIFYs are this server's own
        try:
            if len(items) == 1:
                cur = await c.execute(ONE_SQL, items[0])
            else:
                cur = await c.execute(BATCH_SQL, {"items": Jsonb(items)})
            row = await cur.fetchone()
            await cur.close()
        except BaseException as e:
            if c.broken or c.closed:
                self.raw.own_pids.discard(c.info.backend_pid)
                self._conn = None
                await c.close()
            if isinstance(e, psycopg.errors.UndefinedFunction):
                log.warning("ow_claim_v1 or ow_claim_batch_v1 is missing (migrations 0005-0006 "
                            "not applied): claims use the Python path")  # fmt: skip
                self.enabled = False
            raise
        assert row is not None
        return [row[0]] if len(items) == 1 else row[0]

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @staticmethod
    def _result(
        out: dict, p: Principal, worker_id: str, lease_s: float, done: RunDone | None, secret: str
    ) -> tuple[dict | None, Claim | None]:
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
