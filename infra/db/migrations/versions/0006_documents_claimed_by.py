"""documents.claimed_by: the event_id that claimed the current version

A copy of an unversioned lifecycle event (a producer's retry, a redelivery
after a crash) resolves to the version its first copy claimed instead of
starting a newer one. Existing rows start empty: the next event of each
document fills it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.drop_column("claimed_by")
