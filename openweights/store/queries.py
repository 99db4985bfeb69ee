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

import json as _json
import re
import threading
from dataclasses import dataclass
from typing import Any

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

-- wait_reason --
-- The cluster manager's live reason a pending job waits (spend cap, cooldown, a pod booting...).
SELECT reason FROM cluster_waits
WHERE org_id = :org_id AND job_id = :job_id AND expires_at >= :now

-- insert_job_notify:postgresql --
-- `insert_job`, and other servers told when it commits (`notify`): no row, and no notification,
-- on a resubmit.
-- json: params, allowed_hardware
WITH ins AS (
    INSERT INTO jobs (org_id, id, type, status, params, script, model, requires_vram_gb,
                      allowed_hardware, docker_image, outputs, attempts, max_attempts, timeout_s,
                      error, current_run_id, worker_id, created_at, updated_at, queued_at,
                      started_at, finished_at)
    VALUES (:org_id, :id, :type, 'pending', :params, :script, :model, :requires_vram_gb,
            :allowed_hardware, :docker_image, NULL, 0, :max_attempts, :timeout_s, NULL,
            NULL, NULL, :now, :now, :now, NULL, NULL)
    ON CONFLICT (org_id, id) DO NOTHING
    RETURNING pk)
SELECT pk,
       (SELECT count(pg_notify(:channel, k)) FROM unnest(CAST(:keys AS text[])) AS k
        WHERE ins.pk IS NOT NULL) AS notified
FROM ins

-- pending_inputs:postgresql --
-- What a pending job's reason needs in one round trip: the manager's reason, live workers, jobs ahead.
WITH w AS (SELECT id, hardware_type, vram_gb, docker_image, any_hardware, current_run_id
           FROM workers WHERE org_id = :org_id AND status = 'active' AND last_seen_at >= :since)
SELECT (SELECT reason FROM cluster_waits
        WHERE org_id = :org_id AND job_id = :job_id AND expires_at >= :now) AS reason,
       (SELECT coalesce(json_agg(w), '[]')::text FROM w) AS live,
       CASE WHEN EXISTS (SELECT 1 FROM w)
            THEN (SELECT count(*) FROM (SELECT 1 FROM jobs
                  WHERE org_id = :org_id AND status = 'pending' AND queued_at < :queued_at
                  LIMIT :cap) AS a) END AS ahead

-- jobs_ahead --
-- How many pending jobs of an org were queued before a time, counted up to :cap (a bounded scan).
SELECT count(*) FROM (SELECT 1 FROM jobs
    WHERE org_id = :org_id AND status = 'pending' AND queued_at < :queued_at LIMIT :cap) AS a

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
RETURNING id AS run_id, attempt AS run_attempt

-- claim_take:postgresql --
-- As claim_take, locking the job row (skipped when another claim holds it) and starting the job.
-- json: params, allowed_hardware, outputs
WITH job AS (
  SELECT pk, org_id, attempts FROM jobs WHERE pk = :job_pk AND status = 'pending'
  FOR UPDATE SKIP LOCKED
), run AS (
  INSERT INTO runs (org_id, job_pk, worker_id, attempt, status, lease_expires_at, started_at,
                    log_size, hardware)
  SELECT org_id, pk, :worker_id, attempts + 1, 'in_progress', :lease_expires_at, :now, 0, :hardware
  FROM job
  RETURNING id, attempt, job_pk
)
UPDATE jobs
SET status = 'in_progress', attempts = run.attempt, current_run_id = run.id,
    worker_id = :worker_id, updated_at = :now, started_at = COALESCE(jobs.started_at, :now)
FROM run WHERE jobs.pk = run.job_pk
RETURNING run.id AS run_id, run.attempt AS run_attempt, jobs.pk, jobs.org_id, jobs.id, jobs.type,
          jobs.status, jobs.params, jobs.script, jobs.model, jobs.requires_vram_gb,
          jobs.allowed_hardware, jobs.docker_image, jobs.outputs, jobs.attempts, jobs.max_attempts,
          jobs.timeout_s, jobs.error, jobs.current_run_id, jobs.worker_id, jobs.created_at,
          jobs.updated_at, jobs.queued_at, jobs.started_at, jobs.finished_at

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
    elif re.match(r"(?i)\s*WITH\b", sql) and len(parts := _top_level(sql, r"\bSELECT\b")) > 1:
        items = _top_level(parts[1], r"\bFROM\b")[0]  # the SELECT after the CTEs
    else:
        return None
    names = []
    for i, item in enumerate(_top_level(items, ",")):
        m = _NAMED.match(item.strip())
        names.append((m[1] or m[2]) if m else f"_col{i}")  # an unnamed expression: by position
    return names


def _statement(sql: str, json: list[str]) -> TextClause | TextualSelect:
    stmt = _build(sql, json)
    RAW[id(stmt)] = _raw(sql, json)
    return stmt


def _build(sql: str, json: list[str]) -> TextClause | TextualSelect:
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
            raise ValueError(f"query {name!r} needs a description after its name")
        json: list[str] = []
        body: list[str] = []
        for line in lines[1:]:
            if not body and line.startswith("-- ") and not line.startswith("-- json:"):
                continue  # the description goes on
            if line.startswith("-- json:"):
                json = [n.strip() for n in line.removeprefix("-- json:").split(",") if n.strip()]
            else:
                body.append(line)
        sql = "\n".join(body).strip().rstrip(";")
        if not sql:
            raise ValueError(f"query {name!r} is empty")
        out[(name, dialect)] = _statement(sql, json)
    return out


@dataclass(frozen=True)
class RawStatement:
    """A named statement for the DBAPI driver itself (`RawConnection`)."""

    sqlite: str  # `:name` parameters (sqlite3's named style)
    postgresql: str  # `%(name)s` parameters (psycopg's pyformat style)
    json_in: tuple[str, ...]  # parameters sent as JSON text
    names: tuple[str, ...] | None  # result columns, in order (None: no rows)
    json_out: frozenset[int]  # positions of JSON result columns (decoded on SQLite)


#: id(statement) -> its raw form; filled by `parse`, so every named statement has one.
RAW: dict[int, RawStatement] = {}
_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def _raw(sql: str, json: list[str]) -> RawStatement:
    names = _result_names(sql)
    return RawStatement(
        sqlite=sql,
        postgresql=_PARAM.sub(r"%(\1)s", sql.replace("%", "%%")),
        json_in=tuple(n for n in json if re.search(rf":{n}\b", sql)),
        names=tuple(names) if names is not None else None,
        json_out=frozenset(i for i, n in enumerate(names or ()) if n in json),
    )


QUERIES = parse(SQL)
_NOTIFY = id(QUERIES[("notify", "postgresql")])


def query(conn: Connection, name: str) -> TextClause | TextualSelect:
    """The statement `name`, in the connection's dialect variant where it has one."""
    stmt = QUERIES.get((name, conn.dialect.name))
    return stmt if stmt is not None else QUERIES[(name, "")]


# -- the same statements on the DBAPI driver itself ------------------------------------------


class _Dialect:
    def __init__(self, name: str) -> None:
        self.name = name


class RawResult:
    """The part of SQLAlchemy's `Result` the store uses, over rows already fetched."""

    __slots__ = ("_rows", "_names", "_maps", "rowcount")

    def __init__(self, rows: list[Any], names: tuple[str, ...] | None, rowcount: int) -> None:
        self._rows = rows
        self._names = names
        self._maps = False
        self.rowcount = rowcount

    def mappings(self) -> RawResult:
        out = RawResult(self._rows, self._names, self.rowcount)
        out._maps = True
        return out

    def _row(self, row: tuple) -> Any:
        return dict(zip(self._names or (), row, strict=True)) if self._maps else row

    def first(self) -> Any:
        return self._row(self._rows[0]) if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._row(self._rows[0])

    def all(self) -> list[Any]:
        return [self._row(r) for r in self._rows]

    def __iter__(self):
        return iter(self.all())

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        return self.one()[0] if not self._maps else next(iter(self.one().values()))


class NotRaw(TypeError):
    """A statement that is not one of this module's: run the transaction on SQLAlchemy."""


class RawConnection:
    """A DBAPI connection (sqlite3 or psycopg) that runs the named statements of this module with
    the same parameters and results as SQLAlchemy, without its per-execution work (~60–100 µs a
    statement). The hot-path store functions take either: they only call `execute(query(conn,
    name), params)` and `conn.dialect.name`. Transactions are the caller's (`begin`/`commit`)."""

    def __init__(self, dbapi_conn: Any, dialect: str) -> None:
        self.dbapi = dbapi_conn
        self.dialect = _Dialect(dialect)
        self._sqlite = dialect == "sqlite"
        self.statements = 0
        #: NOTIFYs of this transaction: they take effect at COMMIT, so they are sent with it
        self.deferred: list[tuple[str, Any]] = []
        #: PostgreSQL: statements that return no rows, not sent yet (`_postgresql`)
        self.pending: list[tuple[str, Any]] = []

    def execute(self, stmt: Any, params: Any = None) -> RawResult:
        raw = RAW.get(id(stmt))
        if raw is None:
            raise NotRaw(f"not a named statement of openweights.store.queries: {stmt!r}")
        sql = raw.sqlite if self._sqlite else raw.postgresql
        if id(stmt) == _NOTIFY:  # sent with the COMMIT, in one round trip (`RawDatabase.run`)
            self.deferred.append((sql, params))
            return RawResult([], None, 0)
        many = isinstance(params, list)
        if raw.json_in:
            params = [_dump(p, raw.json_in) for p in params] if many else _dump(params, raw.json_in)
        if not self._sqlite:
            return self._postgresql(sql, params or {}, raw.names, many)
        # sqlite3 makes the cursor itself (one Python call less a statement)
        cur = self.dbapi.executemany(sql, params) if many else self.dbapi.execute(sql, params or {})
        try:
            self.statements += 1
            rows = cur.fetchall() if raw.names is not None else []
            rowcount = cur.rowcount
        finally:
            cur.close()
        if raw.json_out and rows:  # PostgreSQL's driver decodes jsonb itself
            loads = _json.loads
            decoded = []
            for r in rows:
                r = list(r)
                for i in raw.json_out:
                    if r[i] is not None:
                        r[i] = loads(r[i])
                decoded.append(r)
            rows = decoded
        return RawResult(rows, raw.names, rowcount)

    def _postgresql(
        self, sql: str, params: Any, names: tuple[str, ...] | None, many: bool
    ) -> RawResult:
        """A statement that returns no rows waits, and goes to the server with the next one that
        does (or with the COMMIT: `RawDatabase.run`) in one pipeline: one round trip for several
        statements, run in their order, so every read still sees the transaction's own earlier
        writes. An error of a waiting statement is raised where it is sent: it aborts the
        transaction all the same, and nothing leaves the transaction before COMMIT. (No hot
        caller reads the row count of a statement that returns no rows.) The first statement of
        a transaction is always sent at once: a connection the database dropped while it was
        idle fails there, with nothing run, and `RawDatabase.run` runs it again on a new one."""
        if names is None and not many and self.statements:
            self.pending.append((sql, params))
            return RawResult([], None, -1)
        c = self.dbapi
        cur = c.cursor()
        try:
            if self.pending:
                pending, self.pending = self.pending, []
                self.statements += len(pending)
                with c.pipeline():
                    for q, p in pending:
                        c.execute(q, p)
                    if many:
                        cur.executemany(sql, params)
                    else:
                        cur.execute(sql, params)
            elif not self.statements:
                # The transaction's first statement: its BEGIN goes in the same round trip
                # (outside a pipeline psycopg sends BEGIN on its own and waits for it).
                with c.pipeline():
                    if many:
                        cur.executemany(sql, params)
                    else:
                        cur.execute(sql, params)
            elif many:
                cur.executemany(sql, params)
            else:
                cur.execute(sql, params)
            self.statements += 1
            rows = cur.fetchall() if names is not None else []
            return RawResult(rows, names, cur.rowcount)
        finally:
            cur.close()


def _dump(params: dict, keys: tuple[str, ...]) -> dict:
    params = dict(params)
    for k in keys:
        if params.get(k) is not None:
            params[k] = _json.dumps(params[k])
    return params


class Busy(Exception):
    """SQLite's write lock is held by another connection (`RawDatabase.write(wait=False)`)."""


class RawDatabase:
    """Write transactions on the driver's own connections, for the server's hot routes.

    SQLite: one connection per thread (`BEGIN IMMEDIATE`, as `Database.write`), plus, with
    `wait=False`, a connection that raises `Busy` at once instead of waiting for the write lock,
    so that the event loop may run a short transaction itself and hand it to a thread only when
    another writer holds the lock. PostgreSQL: a small pool of psycopg connections; a connection
    that the database dropped while it was idle (a restart) is replaced and the transaction run
    again, since nothing of it ran.
    """

    #: SQLite: seconds between two checkpoints of the WAL by the background thread
    CHECKPOINT_S = 0.25

    def __init__(self, url: str, own_pids: set[int] | None = None) -> None:
        self.dialect = url.split(":", 1)[0].split("+", 1)[0]
        self._lock = threading.Lock()
        self._all: list[Any] = []
        self._closed = threading.Event()
        self._commits = 0  # SQLite: commits since the last checkpoint
        self._checkpointer: threading.Thread | None = None
        #: PostgreSQL: backend pids of this pool's open connections (the server's LISTEN
        #: thread skips their NOTIFYs: it has acted on them already, at their commit)
        self.own_pids = own_pids if own_pids is not None else set()
        if self.dialect == "sqlite":
            self._path = url.split("///", 1)[1]
            self._local = threading.local()
        else:
            self._dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
            self._idle: list[Any] = []

    def _sqlite(self, busy_ms: int) -> Any:
        import sqlite3

        c = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000
        )
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("PRAGMA foreign_keys=ON")
        c.execute(f"PRAGMA busy_timeout={busy_ms}")
        # These connections never checkpoint at COMMIT (SQLite's default every 1000 WAL pages,
        # with an fsync of the WAL and of the database file, in the request that happens to
        # cross it): the background thread below does, off the request path. Same durability.
        c.execute("PRAGMA wal_autocheckpoint=0")
        with self._lock:
            self._all.append(c)
            if self._checkpointer is None:
                self._checkpointer = threading.Thread(
                    target=self._checkpoint_loop, daemon=True, name="ow-wal-checkpoint"
                )
                self._checkpointer.start()
        return c

    def _checkpoint_loop(self) -> None:
        """SQLite: copy the WAL into the database every `CHECKPOINT_S` while there are commits.
        PASSIVE never waits for readers or writers; the WAL restarts from its beginning once a
        checkpoint has caught up."""
        import sqlite3

        c = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            while not self._closed.wait(self.CHECKPOINT_S):
                if self._commits:
                    self._commits = 0
                    try:
                        c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error:  # busy or locked: the next turn retries
                        pass
        finally:
            c.close()

    def run(self, fn: Any, *, wait: bool = True, write: bool = True) -> Any:
        """`fn(conn)` in one transaction, committed when it returns; `write=False`: a read
        (SQLite: a deferred transaction, which never waits for the write lock)."""
        if self.dialect == "sqlite":
            if wait:
                c = getattr(self._local, "conn", None)
                if c is None:
                    c = self._local.conn = self._sqlite(30_000)
            else:
                c = getattr(self._local, "nowait", None)
                if c is None:
                    c = self._local.nowait = self._sqlite(0)
            try:
                c.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except Exception as e:
                if not wait and "locked" in str(e):
                    raise Busy() from e
                raise
            conn = RawConnection(c, "sqlite")
            try:
                out = fn(conn)
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
            if write:
                self._commits += 1
            return out
        import psycopg

        for attempt in range(2):
            with self._lock:
                c = self._idle.pop() if self._idle else None
            if c is None or c.closed:
                c = psycopg.connect(self._dsn, autocommit=False)
                self.own_pids.add(c.info.backend_pid)
                with self._lock:
                    self._all.append(c)
            conn = RawConnection(c, "postgresql")
            # A read runs in autocommit: under READ COMMITTED each statement takes its own
            # snapshot inside a transaction too, so BEGIN/COMMIT would add a round trip and
            # nothing else.
            c.autocommit = not write
            try:
                out = fn(conn)
                tail = conn.pending + conn.deferred
                if tail:  # the writes not sent yet, the NOTIFYs and COMMIT: one round trip
                    conn.statements += len(tail)  # sent now: a failure must not rerun them
                    with c.pipeline():
                        for sql, params in tail:
                            c.execute(sql, params)
                        c.commit()
                else:
                    c.commit()
            except psycopg.OperationalError:
                broken = c.closed or c.broken
                if not broken:
                    c.rollback()
                    c.autocommit = False
                    with self._lock:
                        self._idle.append(c)
                else:
                    self._discard(c)
                if broken and conn.statements == 0 and attempt == 0:
                    continue  # dropped while idle: nothing ran, run it on a new connection
                raise
            except BaseException:
                if c.broken or c.closed:
                    self._discard(c)
                else:
                    c.rollback()
                    c.autocommit = False
                    with self._lock:
                        self._idle.append(c)
                raise
            c.autocommit = False
            with self._lock:
                self._idle.append(c)
            return out
        raise AssertionError("unreachable")

    @property
    def dsn(self) -> str:
        """PostgreSQL: the libpq connection string."""
        return self._dsn

    def once(self, *statements: tuple[Any, dict]) -> list[tuple | None]:
        """PostgreSQL: named statements of this module (`query`'s), in order, in one round trip
        (pipelined, in autocommit: no BEGIN or COMMIT to send; the server runs what comes
        before the pipeline's sync point in one implicit transaction); the first row of each
        (None: it returned none). On an error nothing of the failing statement stays, those
        after it do not run, and the error is raised."""
        sent = []
        for stmt, params in statements:
            raw = RAW.get(id(stmt))
            if raw is None:
                raise NotRaw(f"not a named statement of openweights.store.queries: {stmt!r}")
            sent.append((raw.postgresql, _dump(params, raw.json_in) if raw.json_in else params))
        return self._pipelined(sent)

    def _pipelined(self, statements: list[tuple[str, dict]]) -> list[tuple | None]:
        with self._lock:
            c = self._idle.pop() if self._idle else None
        if c is None or c.closed:
            import psycopg

            c = psycopg.connect(self._dsn, autocommit=False)
            self.own_pids.add(c.info.backend_pid)
            with self._lock:
                self._all.append(c)
        c.autocommit = True
        try:
            curs = [c.cursor() for _ in statements]
            with c.pipeline():
                for cur, (sql, params) in zip(curs, statements, strict=True):
                    cur.execute(sql, params)
            rows = [cur.fetchone() if cur.description is not None else None for cur in curs]
            for cur in curs:
                cur.close()
        except BaseException:
            if c.broken or c.closed:
                self._discard(c)
            else:
                c.autocommit = False
                with self._lock:
                    self._idle.append(c)
            raise
        c.autocommit = False
        with self._lock:
            self._idle.append(c)
        return rows

    def _discard(self, c: Any) -> None:
        self.own_pids.discard(c.info.backend_pid)
        c.close()
        with self._lock:
            if c in self._all:
                self._all.remove(c)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            conns, self._all = self._all, []
            if self.dialect != "sqlite":
                self._idle.clear()
        for c in conns:
            try:
                c.close()
            except Exception:
                pass
