"""index tokens by run: a run's completion revokes its token by run id

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tokens_run", "tokens", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_tokens_run", table_name="tokens")
