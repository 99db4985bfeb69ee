"""cluster pods (billed pod time) and the manager's reasons a job waits

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cluster_pods",
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("pod_id", sa.String(length=200), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("hardware_type", sa.String(length=64), nullable=False),
        sa.Column("price_per_hour", sa.Float(), nullable=False),
        sa.Column("image", sa.String(length=500), nullable=True),
        sa.Column("token_id", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=200), nullable=True),
        sa.Column("worker_id", sa.String(length=64), nullable=True),
        sa.Column("launched_at", sa.Float(), nullable=False),
        sa.Column("registered_at", sa.Float(), nullable=True),
        sa.Column("terminated_at", sa.Float(), nullable=True),
        sa.Column("termination_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"]),
        sa.PrimaryKeyConstraint("org_id", "provider", "pod_id"),
    )
    op.create_index(
        "ix_cluster_pods_org_launched", "cluster_pods", ["org_id", "launched_at"], unique=False
    )
    op.create_index("ix_cluster_pods_org_name", "cluster_pods", ["org_id", "name"], unique=False)
    op.create_table(
        "cluster_waits",
        sa.Column("org_id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"]),
        sa.PrimaryKeyConstraint("org_id", "job_id"),
    )


def downgrade() -> None:
    op.drop_table("cluster_waits")
    op.drop_index("ix_cluster_pods_org_name", table_name="cluster_pods")
    op.drop_index("ix_cluster_pods_org_launched", table_name="cluster_pods")
    op.drop_table("cluster_pods")
