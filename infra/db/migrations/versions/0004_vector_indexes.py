"""vector_indexes: each dataset's vector indexes (serving, building, retired)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vector_indexes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("dataset_id", sa.String(length=128), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("model_spec", sa.String(length=1024), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("collection", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress_done", sa.BigInteger(), nullable=False),
        sa.Column("progress_total", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("switched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("drop_after", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "tenant_id", "dataset_id", "provider", "model", name="uq_vector_indexes_model"
        ),
    )
    op.create_index(
        "uq_vector_indexes_serving",
        "vector_indexes",
        ["tenant_id", "dataset_id"],
        unique=True,
        sqlite_where=sa.text("state = 'serving'"),
        postgresql_where=sa.text("state = 'serving'"),
    )


def downgrade() -> None:
    op.drop_index("uq_vector_indexes_serving", table_name="vector_indexes")
    op.drop_table("vector_indexes")
