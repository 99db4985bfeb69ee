"""PostgreSQL: several workers' claims in one call of `ow_claim_batch_v1`

Revision ID: 0006
Revises: 0005

A server that has several claims to answer at once (workers that asked while its last call was in
the database) sends them together: `ow_claim_batch_v1(items jsonb)` calls `ow_claim_v1` for each
item, in order, in one transaction, each in its own subtransaction, so that an item that raises
(`OWFB0`: take the Python path; or any other error) is rolled back alone and answered
`{"error": sqlstate, "message": ...}` while the others stay. One round trip, one commit (one WAL
flush) and one thread hop for the batch instead of one per claim. `server/pg_claim.py` calls it.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FUNCTION = r"""
CREATE OR REPLACE FUNCTION ow_claim_batch_v1(p_items jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    it jsonb;
    v_out jsonb := '[]'::jsonb;
BEGIN
    FOR it IN SELECT value FROM jsonb_array_elements(p_items) LOOP
        BEGIN
            v_out := v_out || jsonb_build_array(ow_claim_v1(
                it->>'org', it->>'worker', it->>'kind', it->>'token', (it->>'lease_s')::float8,
                (it->>'done_run')::bigint, it->>'done_status', (it->>'done_exit')::integer,
                it->>'done_error', it->>'log_file', it->>'log_sha', it->>'token_id',
                it->>'token_hash', it->>'token_prefix'));
        EXCEPTION WHEN OTHERS THEN
            v_out := v_out || jsonb_build_array(
                jsonb_build_object('error', SQLSTATE, 'message', SQLERRM));
        END;
    END LOOP;
    RETURN v_out;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS ow_claim_batch_v1(jsonb)")
