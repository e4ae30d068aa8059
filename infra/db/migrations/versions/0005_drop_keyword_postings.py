"""drop keyword_postings: keywords live in Milvus's full-text (BM25) index

After upgrading, `kbstream rebuild --dataset NAME` fills the keyword index of an
existing dataset from its stored segments (no re-embedding: the embedding cache
answers); `kbstream verify` says so until it is done.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("keyword_postings", schema=None) as batch_op:
        batch_op.drop_index("ix_postings_node")
        batch_op.drop_index("ix_postings_document")
    op.drop_table("keyword_postings")


def downgrade() -> None:
    # the table comes back empty: `rebuild` on the older version fills it
    op.create_table(
        "keyword_postings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("dataset_id", sa.String(length=128), nullable=False),
        sa.Column("keyword", sa.String(length=128), nullable=False),
        sa.Column("index_node_id", sa.String(length=64), nullable=False),
        sa.Column("document_id", sa.String(length=128), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "tenant_id", "dataset_id", "keyword", "index_node_id", name="uq_postings_key"
        ),
    )
    with op.batch_alter_table("keyword_postings", schema=None) as batch_op:
        batch_op.create_index(
            "ix_postings_document", ["tenant_id", "dataset_id", "document_id"], unique=False
        )
        batch_op.create_index("ix_postings_node", ["index_node_id"], unique=False)
