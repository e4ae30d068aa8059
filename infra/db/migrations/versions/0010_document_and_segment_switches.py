"""documents.enabled, documents.archived, segments.enabled: Dify's switches

A disabled or archived document, and a disabled segment, keep their rows,
texts and cached vectors but are out of both indexes (issue 19). Existing
rows are enabled and not archived.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.add_column(
            sa.Column("archived", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("segments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true())
        )


def downgrade() -> None:
    with op.batch_alter_table("segments", schema=None) as batch_op:
        batch_op.drop_column("enabled")
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.drop_column("archived")
        batch_op.drop_column("enabled")
