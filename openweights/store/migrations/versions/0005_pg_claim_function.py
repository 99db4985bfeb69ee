"""PostgreSQL: a worker's claim (with the completion it carries) as one function call

Revision ID: 0005
Revises: 0004

`ow_claim_v1` runs, inside PostgreSQL, the statements of the common case of
`POST /v1/workers/{id}/claim` that the server otherwise sends one by one (store/jobs.py: `lock_run`,
`finish_run`, `checkin_worker`, `claim`, `create_token`): one round trip and one statement per job
instead of ~7 round trips and ~16 statements. It does only what the Python path does in that case,
statement for statement, and raises SQLSTATE `OWFB0` ("take the Python path") for every other case
— anything that Python answers with an error, a run with a log to store, a run that declared a
model, a status the fast case does not cover — so that the transaction is rolled back with
nothing written and the server runs the Python path, which then answers as it always did.
`openweights/server/pg_claim.py` calls it; tests/test_api.py runs both paths on PostgreSQL.
SQLite has no functions: nothing to do there.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FUNCTION = r"""
CREATE OR REPLACE FUNCTION ow_claim_v1(
    p_org text, p_worker text, p_caller_kind text, p_caller_token text, p_lease_s float8,
    p_done_run bigint, p_done_status text, p_done_exit integer, p_done_error text,
    p_log_file text, p_log_sha text,
    p_token_id text, p_token_hash text, p_token_prefix text
) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    v_now float8 := extract(epoch from clock_timestamp());
    r record;       -- the completed run with its job (lock_run)
    w record;       -- the worker (checkin_worker)
    c record;       -- a candidate job
    v_done_job text;
    v_outputs jsonb;
    v_reason text;
    v_cached jsonb;
    v_after_q float8 := -1;
    v_after_pk bigint := 0;
    v_limit integer := 8;
    v_rows integer;
    v_first bigint[];
    v_rest bigint[];
    v_pk bigint;
    v_run_id bigint;
    v_attempt integer;
    v_job jsonb;
BEGIN
    -- 1. the run the claim's `done` completes (complete_then: live + finish, no log)
    IF p_done_run IS NOT NULL THEN
        SELECT runs.id, runs.worker_id, runs.status, runs.log_size, jobs.pk AS job_pk,
               jobs.id AS job_id, jobs.status AS job_status, jobs.current_run_id,
               (SELECT token_id FROM workers WHERE workers.id = runs.worker_id) AS worker_token_id
        INTO r
        FROM runs JOIN jobs ON jobs.pk = runs.job_pk
        WHERE runs.id = p_done_run AND runs.org_id = p_org
        FOR UPDATE OF runs, jobs;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'run not found' USING ERRCODE = 'OWFB0';
        END IF;
        IF p_caller_kind = 'worker' AND r.worker_id IS NOT NULL
           AND r.worker_token_id IS DISTINCT FROM p_caller_token THEN
            RAISE EXCEPTION 'run of another worker token' USING ERRCODE = 'OWFB0';
        END IF;
        IF r.status <> 'in_progress' OR r.current_run_id IS DISTINCT FROM r.id
           OR r.log_size <> 0 THEN
            RAISE EXCEPTION 'not a live run without a log' USING ERRCODE = 'OWFB0';
        END IF;
        IF p_done_status NOT IN ('completed', 'failed', 'canceled') THEN
            RAISE EXCEPTION 'status %', p_done_status USING ERRCODE = 'OWFB0';
        END IF;
        v_done_job := r.job_id;

        INSERT INTO files (org_id, id, filename, purpose, bytes, sha256, created_at)
        VALUES (p_org, p_log_file, 'run-' || r.id || '.log', 'log', 0, p_log_sha, v_now)
        ON CONFLICT (org_id, id) DO NOTHING;
        UPDATE runs
        SET status = p_done_status, finished_at = v_now, exit_code = p_done_exit,
            error = p_done_error, lease_expires_at = NULL, log_file = p_log_file
        WHERE id = r.id;
        IF r.worker_id IS NOT NULL THEN
            UPDATE workers SET current_run_id = NULL
            WHERE id = r.worker_id AND current_run_id = r.id;
        END IF;
        UPDATE tokens SET revoked_at = v_now WHERE run_id = r.id AND revoked_at IS NULL;

        IF r.job_status = 'canceled' THEN
            UPDATE jobs SET updated_at = v_now WHERE pk = r.job_pk;
        ELSIF p_done_status = 'completed' THEN
            IF EXISTS (SELECT 1 FROM events WHERE run_id = r.id AND data->>'type' = 'model') THEN
                RAISE EXCEPTION 'run declared a model' USING ERRCODE = 'OWFB0';
            END IF;
            -- _merge: each event's fields in event order, the last non-null value of each
            SELECT coalesce(jsonb_object_agg(f.key, f.value ORDER BY e.id), '{}'::jsonb)
            INTO v_outputs
            FROM events e CROSS JOIN LATERAL jsonb_each(e.data) AS f
            WHERE e.run_id = r.id AND jsonb_typeof(e.data) = 'object'
              AND jsonb_typeof(f.value) <> 'null';
            UPDATE jobs
            SET status = 'completed', outputs = v_outputs, finished_at = v_now, error = NULL,
                updated_at = v_now
            WHERE pk = r.job_pk;
        ELSE
            IF p_done_status = 'failed' THEN
                v_reason := coalesce(nullif(p_done_error, ''),
                                     'exit code ' || coalesce(p_done_exit::text, 'None'));
            ELSE
                v_reason := coalesce(nullif(p_done_error, ''), 'canceled by its worker');
            END IF;
            UPDATE jobs SET status = 'failed', finished_at = v_now, error = v_reason,
                            updated_at = v_now
            WHERE pk = r.job_pk;
        END IF;
        PERFORM pg_notify('openweights', k) FROM unnest(ARRAY[
            'job:' || p_org || ':' || r.job_id, 'run:' || r.id, 'queue:' || p_org,
            'auth:run:' || r.id]) AS k;
    END IF;

    -- 2. check the worker in (checkin_worker, check_worker_caller)
    UPDATE workers SET last_seen_at = v_now WHERE id = p_worker AND org_id = p_org
    RETURNING id, status, hardware_type, vram_gb, docker_image, any_hardware, cached_models,
              token_id
    INTO w;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'worker not found' USING ERRCODE = 'OWFB0';
    END IF;
    IF p_caller_kind = 'worker' AND w.token_id IS DISTINCT FROM p_caller_token THEN
        RAISE EXCEPTION 'worker of another token' USING ERRCODE = 'OWFB0';
    END IF;
    IF w.status <> 'active' THEN
        RAISE EXCEPTION 'worker shut down' USING ERRCODE = 'OWFB0';
    END IF;
    v_cached := CASE WHEN jsonb_typeof(w.cached_models) = 'array' THEN w.cached_models
                     ELSE '[]'::jsonb END;

    -- 3. claim (jobs.claim): batches of the oldest pending jobs (8, then 64), no lock; those
    -- that fit, the ones for a model the worker has cached first; lock one, skipping locked.
    <<batches>>
    LOOP
        v_rows := 0;
        v_first := '{}';
        v_rest := '{}';
        FOR c IN
            SELECT pk, queued_at, model, allowed_hardware, requires_vram_gb, docker_image
            FROM jobs
            WHERE org_id = p_org AND status = 'pending'
              AND queued_at >= v_after_q AND (queued_at > v_after_q OR pk > v_after_pk)
              AND (w.any_hardware OR allowed_hardware IS NOT NULL
                   OR requires_vram_gb <= w.vram_gb)
              AND (w.docker_image IS NULL OR docker_image IS NULL
                   OR docker_image = w.docker_image)
            ORDER BY queued_at, pk
            LIMIT v_limit
        LOOP
            v_rows := v_rows + 1;
            v_after_q := c.queued_at;
            v_after_pk := c.pk;
            IF c.allowed_hardware IS NOT NULL AND jsonb_typeof(c.allowed_hardware) <> 'array'
               AND NOT w.any_hardware THEN
                RAISE EXCEPTION 'allowed_hardware is not a list' USING ERRCODE = 'OWFB0';
            END IF;
            IF NOT (w.any_hardware OR CASE
                    WHEN jsonb_array_length(coalesce(c.allowed_hardware, '[]'::jsonb)) > 0
                        THEN c.allowed_hardware ? w.hardware_type
                    ELSE coalesce(c.requires_vram_gb, 0) <= w.vram_gb END) THEN
                CONTINUE;
            END IF;
            IF c.model IS NOT NULL AND c.model <> '' AND v_cached ? c.model THEN
                v_first := v_first || c.pk;
            ELSE
                v_rest := v_rest || c.pk;
            END IF;
        END LOOP;
        IF v_rows = 0 THEN
            v_pk := NULL;
            EXIT batches;
        END IF;
        FOREACH v_pk IN ARRAY v_first || v_rest LOOP
            PERFORM 1 FROM jobs WHERE pk = v_pk AND status = 'pending' FOR UPDATE SKIP LOCKED;
            IF FOUND THEN
                EXIT batches;
            END IF;
        END LOOP;
        v_pk := NULL;
        v_limit := 64;
    END LOOP;

    IF v_pk IS NULL THEN
        RETURN jsonb_build_object('now', v_now, 'done_job_id', v_done_job);
    END IF;

    INSERT INTO runs (org_id, job_pk, worker_id, attempt, status, lease_expires_at, started_at,
                      log_size, hardware)
    SELECT org_id, pk, p_worker, attempts + 1, 'in_progress', v_now + p_lease_s, v_now, 0,
           w.hardware_type
    FROM jobs WHERE pk = v_pk
    RETURNING id, attempt INTO v_run_id, v_attempt;
    UPDATE jobs
    SET status = 'in_progress', attempts = v_attempt, current_run_id = v_run_id,
        worker_id = p_worker, updated_at = v_now, started_at = COALESCE(started_at, v_now)
    WHERE pk = v_pk
    RETURNING to_jsonb(jobs.*) INTO v_job;
    UPDATE workers SET current_run_id = v_run_id, last_seen_at = v_now WHERE id = p_worker;
    INSERT INTO tokens (id, org_id, name, kind, token_hash, prefix, run_id, created_at,
                        expires_at, revoked_at)
    VALUES (p_token_id, p_org, 'run ' || v_run_id, 'run', p_token_hash, p_token_prefix, v_run_id,
            v_now, NULL, NULL);
    PERFORM pg_notify('openweights', 'job:' || p_org || ':' || (v_job->>'id'));
    RETURN jsonb_build_object(
        'now', v_now, 'done_job_id', v_done_job, 'run_id', v_run_id, 'attempt', v_attempt,
        'hardware', w.hardware_type, 'job', v_job);
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION IF EXISTS ow_claim_v1(text, text, text, text, float8, bigint, text, "
            "integer, text, text, text, text, text, text)"
        )
