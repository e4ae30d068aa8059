"""documents.uri, documents.inline_content: what the current version was read from

`verify --repair` republishes a stuck document from its own reference (its
upload, or a file reference under the allowed roots), never from ``source``,
which is a display name the publisher chooses. Existing rows start with both
NULL (unknown): repair then uses only the document's own upload of its
recorded content hash, as before, and otherwise asks for it to be published
again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("uri", sa.String(length=4096), nullable=True))
        batch_op.add_column(sa.Column("inline_content", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.drop_column("inline_content")
        batch_op.drop_column("uri")
