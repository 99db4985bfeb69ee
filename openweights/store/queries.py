"""The SQL of the hot path as named blocks, parsed once at import (as procrastinate's queries.sql).

Each block is `-- name --` (or `-- name:dialect --` for a dialect's own variant, e.g. `FOR UPDATE
SKIP LOCKED` on PostgreSQL where SQLite has one writer), a one-line description, optionally
`-- json: col, …` naming the JSON parameters and result columns, then one statement. Code says
`conn.execute(query(conn, "claim_candidates"), {...})`: the statement object is built once, so
SQLAlchemy neither rebuilds it nor recomputes its cache key per call; only the parameters change.

The SQL is plain and shared by both dialects unless a variant exists: both run `RETURNING`
(SQLite >= 3.35), `ON CONFLICT … DO NOTHING` (SQLite >= 3.24) and correlated subqueries in
`RETURNING`. Parameters are never compared with `IS NULL` (PostgreSQL cannot type a bare NULL
parameter); optional filters take an explicit boolean instead.

It is a Python module, not a .sql file, so that it ships in the wheel without package-data.
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, TextClause, bindparam, column, text
from sqlalchemy.sql.selectable import TextualSelect

from openweights.store.schema import Json

SQL = r"""
-- clock:postgresql --
-- The database's clock in epoch seconds (leases never use a worker's or another server's clock).
SELECT extract(epoch from clock_timestamp())

-- notify:postgresql --
-- Wake other servers' long-polls when this transaction commits: every key in one round trip.
SELECT pg_notify(:channel, k) FROM unnest(CAST(:keys AS text[])) AS k

-- authenticate --
-- The token behind a bearer secret, found by the secret's hash (the secret is never stored).
SELECT id, org_id, kind, run_id, prefix, expires_at, revoked_at
FROM tokens WHERE token_hash = :token_hash

-- insert_token --
-- A new API token, stored as a hash and a display prefix.
INSERT INTO tokens (id, org_id, name, kind, token_hash, prefix, run_id, created_at, expires_at,
                    revoked_at)
VALUES (:id, :org_id, :name, :kind, :token_hash, :prefix, :run_id, :created_at, :expires_at,
        :revoked_at)

-- revoke_run_tokens --
-- A run ended: the token its job's process held stops working.
UPDATE tokens SET revoked_at = :now WHERE run_id = :run_id AND revoked_at IS NULL

-- secret_env --
-- An org's encrypted secrets, for a job's environment.
SELECT name, value_encrypted FROM secrets WHERE org_id = :org_id

-- insert_job --
-- A new pending job; no row when the org already has a job with this id (a resubmit).
-- json: params, allowed_hardware
INSERT INTO jobs (org_id, id, type, status, params, script, model, requires_vram_gb,
                  allowed_hardware, docker_image, outputs, attempts, max_attempts, timeout_s, error,
                  current_run_id, worker_id, created_at, updated_at, queued_at, started_at,
                  finished_at)
VALUES (:org_id, :id, :type, 'pending', :params, :script, :model, :requires_vram_gb,
        :allowed_hardware, :docker_image, NULL, 0, :max_attempts, :timeout_s, NULL,
        NULL, NULL, :now, :now, :now, NULL, NULL)
ON CONFLICT (org_id, id) DO NOTHING
RETURNING pk

-- live_workers --
-- An org's active workers seen since a time (what a pending job waits for).
SELECT id, hardware_type, vram_gb, docker_image, any_hardware, current_run_id
FROM workers WHERE org_id = :org_id AND status = 'active' AND last_seen_at >= :since

-- jobs_ahead --
-- How many pending jobs of an org were queued before a time.
SELECT count(*) FROM jobs WHERE org_id = :org_id AND status = 'pending' AND queued_at < :queued_at

-- touch_worker --
-- A worker was heard from.
UPDATE workers SET last_seen_at = :now WHERE id = :worker_id

-- checkin_worker --
-- A worker asks for work: mark it seen and return what a claim needs of it, in one round trip.
-- json: cached_models
UPDATE workers SET last_seen_at = :now WHERE id = :worker_id AND org_id = :org_id
RETURNING id, org_id, status, hardware_type, vram_gb, docker_image, any_hardware, cached_models,
          token_id

-- worker_took_run --
-- A worker holds a run now.
UPDATE workers SET current_run_id = :run_id, last_seen_at = :now WHERE id = :worker_id

-- worker_released_run --
-- A worker's run ended (unless the worker moved on to another run already).
UPDATE workers SET current_run_id = NULL WHERE id = :worker_id AND current_run_id = :run_id

-- claim_candidates --
-- The oldest pending jobs of an org that may fit a worker, after a (queued_at, pk) cursor; no lock.
-- json: allowed_hardware
SELECT pk, queued_at, requires_vram_gb, allowed_hardware, docker_image, model
FROM jobs
WHERE org_id = :org_id AND status = 'pending'
  AND queued_at >= :after_queued_at AND (queued_at > :after_queued_at OR pk > :after_pk)
  AND (:any_hardware OR allowed_hardware IS NOT NULL OR requires_vram_gb <= :vram_gb)
  AND (:any_image OR docker_image IS NULL OR docker_image = :docker_image)
ORDER BY queued_at, pk
LIMIT :limit

-- claim_take --
-- Create the next run of a job that is still pending; no row when another claim took it first.
INSERT INTO runs (org_id, job_pk, worker_id, attempt, status, lease_expires_at, started_at,
                  log_size, hardware)
SELECT org_id, pk, :worker_id, attempts + 1, 'in_progress', :lease_expires_at, :now, 0, :hardware
FROM jobs WHERE pk = :job_pk AND status = 'pending'
RETURNING id, attempt

-- claim_take:postgresql --
-- As claim_take, locking the job row; a row another claim holds is skipped, not waited for.
INSERT INTO runs (org_id, job_pk, worker_id, attempt, status, lease_expires_at, started_at,
                  log_size, hardware)
SELECT org_id, pk, :worker_id, attempts + 1, 'in_progress', :lease_expires_at, :now, 0, :hardware
FROM jobs WHERE pk = :job_pk AND status = 'pending'
FOR UPDATE SKIP LOCKED
RETURNING id, attempt

-- claim_start_job --
-- The claimed job is in progress on its new run; returns the whole job for the worker.
-- json: params, allowed_hardware, outputs
UPDATE jobs
SET status = 'in_progress', attempts = :attempt, current_run_id = :run_id, worker_id = :worker_id,
    updated_at = :now, started_at = COALESCE(started_at, :now)
WHERE pk = :job_pk AND status = 'pending'
RETURNING pk, org_id, id, type, status, params, script, model, requires_vram_gb, allowed_hardware,
          docker_image, outputs, attempts, max_attempts, timeout_s, error, current_run_id,
          worker_id, created_at, updated_at, queued_at, started_at, finished_at

-- get_run --
-- A run, its job's id and the token its worker registered with.
SELECT runs.id, runs.org_id, runs.job_pk, runs.worker_id, runs.attempt, runs.status,
       runs.lease_expires_at, runs.started_at, runs.finished_at, runs.exit_code, runs.error,
       runs.log_size, runs.log_file, runs.hardware, jobs.id AS job_id,
       (SELECT token_id FROM workers WHERE workers.id = runs.worker_id) AS worker_token_id
FROM runs JOIN jobs ON jobs.pk = runs.job_pk
WHERE runs.id = :run_id AND runs.org_id = :org_id

-- lock_run --
-- A run with what fencing needs of its job, and its worker's token (SQLite: one writer, no lock).
SELECT runs.id, runs.org_id, runs.job_pk, runs.worker_id, runs.attempt, runs.status,
       runs.lease_expires_at, runs.started_at, runs.finished_at, runs.exit_code, runs.error,
       runs.log_size, runs.log_file, runs.hardware, jobs.id AS job_id, jobs.status AS job_status,
       jobs.current_run_id AS job_current_run_id, jobs.attempts AS job_attempts,
       jobs.max_attempts AS job_max_attempts,
       (SELECT token_id FROM workers WHERE workers.id = runs.worker_id) AS worker_token_id
FROM runs JOIN jobs ON jobs.pk = runs.job_pk
WHERE runs.id = :run_id AND runs.org_id = :org_id

-- lock_run:postgresql --
-- As lock_run, with the run and job rows locked until the transaction ends.
SELECT runs.id, runs.org_id, runs.job_pk, runs.worker_id, runs.attempt, runs.status,
       runs.lease_expires_at, runs.started_at, runs.finished_at, runs.exit_code, runs.error,
       runs.log_size, runs.log_file, runs.hardware, jobs.id AS job_id, jobs.status AS job_status,
       jobs.current_run_id AS job_current_run_id, jobs.attempts AS job_attempts,
       jobs.max_attempts AS job_max_attempts,
       (SELECT token_id FROM workers WHERE workers.id = runs.worker_id) AS worker_token_id
FROM runs JOIN jobs ON jobs.pk = runs.job_pk
WHERE runs.id = :run_id AND runs.org_id = :org_id
FOR UPDATE OF runs, jobs

-- run_status --
-- A run's status and its job's (a heartbeat's answer after its wait).
SELECT runs.status, jobs.status AS job_status
FROM runs JOIN jobs ON jobs.pk = runs.job_pk
WHERE runs.id = :run_id AND runs.org_id = :org_id

-- renew_lease --
-- Extend the lease of the job's live run; no row when the run is not live or its lease lapsed.
UPDATE runs SET lease_expires_at = :lease_expires_at
WHERE id = :run_id AND org_id = :org_id AND status = 'in_progress'
  AND (lease_expires_at IS NULL OR lease_expires_at >= :now)
  AND EXISTS (SELECT 1 FROM jobs WHERE jobs.pk = runs.job_pk AND jobs.current_run_id = runs.id)
RETURNING id, worker_id,
          (SELECT token_id FROM workers WHERE workers.id = runs.worker_id) AS worker_token_id,
          (SELECT status FROM jobs WHERE jobs.pk = runs.job_pk) AS job_status

-- renew_lease_slow --
-- Extend a run's lease (the caller checked it is live, with its rows locked).
UPDATE runs SET lease_expires_at = :lease_expires_at WHERE id = :run_id

-- insert_log_chunk --
-- Bytes of a run's log at a byte offset.
INSERT INTO log_chunks (run_id, "offset", data) VALUES (:run_id, :offset, :data)

-- set_log_size --
-- A run's log grew.
UPDATE runs SET log_size = :log_size WHERE id = :run_id

-- delete_log_chunks --
-- A run's log became a file: drop its chunks.
DELETE FROM log_chunks WHERE run_id = :run_id

-- end_run --
-- A run ends with its final status; it holds no lease any more.
UPDATE runs
SET status = :status, finished_at = :now, exit_code = :exit_code, error = :error,
    lease_expires_at = NULL, log_file = :log_file
WHERE id = :run_id

-- run_outputs --
-- A run's event data, oldest first (merged into the job's outputs).
-- json: data
SELECT data FROM events WHERE run_id = :run_id ORDER BY id

-- job_completed --
-- The live run completed: so did its job.
-- json: outputs
UPDATE jobs
SET status = 'completed', outputs = :outputs, finished_at = :now, error = NULL, updated_at = :now
WHERE pk = :job_pk

-- job_failed --
-- The live run failed, or was lost once too often: so did its job.
UPDATE jobs SET status = 'failed', finished_at = :now, error = :error, updated_at = :now
WHERE pk = :job_pk

-- job_requeued --
-- The live run was lost: its job is pending again, in its old place in the queue.
UPDATE jobs SET status = 'pending', current_run_id = NULL, worker_id = NULL, updated_at = :now
WHERE pk = :job_pk

-- job_touched --
-- A run of a canceled job ended: the job stays canceled.
UPDATE jobs SET updated_at = :now WHERE pk = :job_pk

-- insert_event --
-- One event of a run.
-- json: data
INSERT INTO events (org_id, run_id, job_pk, data, file, created_at)
VALUES (:org_id, :run_id, :job_pk, :data, :file, :now)

-- add_file_once --
-- A file's row unless the org has it (same content and purpose give the same id).
INSERT INTO files (org_id, id, filename, purpose, bytes, sha256, created_at)
VALUES (:org_id, :id, :filename, :purpose, :bytes, :sha256, :now)
ON CONFLICT (org_id, id) DO NOTHING

-- run_model_declarations --
-- The models a completed run declared (`{"type": "model", ...}` events), for the registry.
-- json: data
SELECT data FROM events WHERE run_id = :run_id AND json_extract(data, '$.type') = 'model'

-- run_model_declarations:postgresql --
-- The models a completed run declared (`{"type": "model", ...}` events), for the registry.
-- json: data
SELECT data FROM events WHERE run_id = :run_id AND data->>'type' = 'model'
"""

_HEADER = re.compile(r"^-- ([a-z_]+)(?::([a-z]+))? --$")
_NAMED = re.compile(r"(?is)^(?:.*\bAS\s+(\w+)|(?:\w+\.)?(\w+))$")


def _top_level(sql: str, sep: str) -> list[str]:
    """`sql` split at `sep` (a regex) where it is outside parentheses."""
    parts, depth, start = [], 0, 0
    for m in re.finditer(rf"[()]|{sep}", sql, re.IGNORECASE):
        if m[0] == "(":
            depth += 1
        elif m[0] == ")":
            depth -= 1
        elif depth == 0:
            parts.append(sql[start : m.start()])
            start = m.end()
    parts.append(sql[start:])
    return parts


def _result_names(sql: str) -> list[str] | None:
    """Names of the columns a statement returns, in order (None: it returns no rows)."""
    returning = _top_level(sql, r"\bRETURNING\b")
    if len(returning) > 1:
        items = returning[-1]
    elif re.match(r"(?i)\s*SELECT\b", sql):
        items = _top_level(re.sub(r"(?i)^\s*SELECT\b", "", sql), r"\bFROM\b")[0]
    else:
        return None
    names = []
    for i, item in enumerate(_top_level(items, ",")):
        m = _NAMED.match(item.strip())
        names.append((m[1] or m[2]) if m else f"_col{i}")  # an unnamed expression: by position
    return names


def _statement(sql: str, json: list[str]) -> TextClause | TextualSelect:
    stmt = text(sql)
    binds = [bindparam(n, type_=Json) for n in json if re.search(rf":{n}\b", sql)]
    if binds:
        stmt = stmt.bindparams(*binds)
    names = _result_names(sql)
    if names is None:
        return stmt
    # Every result column, in order: SQLAlchemy then matches them by position and keeps the
    # result metadata with the compiled statement instead of rebuilding it on each execution.
    return stmt.columns(*(column(n, Json) if n in json else column(n) for n in names))


def parse(source: str) -> dict[tuple[str, str], TextClause | TextualSelect]:
    """`{(name, dialect or ""): statement}` from named blocks."""
    blocks: list[tuple[str, str, list[str]]] = []
    for line in source.strip().splitlines():
        m = _HEADER.match(line)
        if m:
            blocks.append((m[1], m[2] or "", []))
        elif blocks:
            blocks[-1][2].append(line)
        elif line.strip():
            raise ValueError(f"SQL outside a named block: {line!r}")
    out: dict[tuple[str, str], TextClause | TextualSelect] = {}
    for name, dialect, lines in blocks:
        if (name, dialect) in out:
            raise ValueError(f"query {name}:{dialect} is defined twice")
        if not lines or not lines[0].startswith("-- "):
            raise ValueError(f"query {name!r} needs a one-line description after its name")
        json: list[str] = []
        body = []
        for line in lines[1:]:
            if line.startswith("-- json:"):
                json = [n.strip() for n in line.removeprefix("-- json:").split(",") if n.strip()]
            else:
                body.append(line)
        sql = "\n".join(body).strip().rstrip(";")
        if not sql:
            raise ValueError(f"query {name!r} is empty")
        out[(name, dialect)] = _statement(sql, json)
    return out


QUERIES = parse(SQL)


def query(conn: Connection, name: str) -> TextClause | TextualSelect:
    """The statement `name`, in the connection's dialect variant where it has one."""
    stmt = QUERIES.get((name, conn.dialect.name))
    return stmt if stmt is not None else QUERIES[(name, "")]
