"""embedding cache keyed by tenant; batch jobs keyed by document and job id

The cache was keyed by (provider, model, doc_hash), so a hit told one tenant
that another held the same text. Each existing vector is copied to every
tenant that has a segment with that doc_hash, and the unkeyed rows go (a
vector no segment uses is dropped: the cache refills on demand).

Batch jobs were keyed by (tenant, job_id), so a job id reused in another
dataset or document overwrote the first job. The key is now (tenant, dataset,
document, job_id); its prefix serves the per-document lookups, so the old
index on (tenant, dataset, document) goes. Existing keys stay unique.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 00:00:00
"""

import warnings

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_COLUMNS = "provider, model, doc_hash, dim, vector, created_at"


def upgrade() -> None:
    _embeddings_table("embeddings_by_tenant", ["tenant_id", "doc_hash", "provider", "model"])
    op.execute(
        f"INSERT INTO embeddings_by_tenant (tenant_id, {_COLUMNS})"
        " SELECT s.tenant_id, e.provider, e.model, e.doc_hash, e.dim, e.vector, e.created_at"
        " FROM embeddings e"
        " JOIN (SELECT DISTINCT tenant_id, doc_hash FROM segments) s"
        " ON s.doc_hash = e.doc_hash"
    )
    op.drop_table("embeddings")
    op.rename_table("embeddings_by_tenant", "embeddings")

    with op.batch_alter_table("batch_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_batch_jobs_document")
    _set_jobs_primary_key(["tenant_id", "dataset_id", "document_id", "job_id"])


def downgrade() -> None:
    # two documents' jobs may share (tenant, job_id): keep one of each
    op.execute(
        "DELETE FROM batch_jobs WHERE EXISTS (SELECT 1 FROM batch_jobs b"
        " WHERE b.tenant_id = batch_jobs.tenant_id AND b.job_id = batch_jobs.job_id"
        " AND (b.dataset_id, b.document_id) < (batch_jobs.dataset_id, batch_jobs.document_id))"
    )
    _set_jobs_primary_key(["tenant_id", "job_id"])
    with op.batch_alter_table("batch_jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_batch_jobs_document", ["tenant_id", "dataset_id", "document_id"], unique=False
        )

    _embeddings_table("embeddings_unkeyed", ["provider", "model", "doc_hash"])
    # one vector per (provider, model, doc_hash): the same text gives the same
    # vector in every tenant, so any tenant's copy will do
    op.execute(
        f"INSERT INTO embeddings_unkeyed ({_COLUMNS}) SELECT {_COLUMNS} FROM embeddings e"
        " WHERE e.tenant_id = (SELECT MIN(x.tenant_id) FROM embeddings x"
        " WHERE x.provider = e.provider AND x.model = e.model AND x.doc_hash = e.doc_hash)"
    )
    op.drop_table("embeddings")
    op.rename_table("embeddings_unkeyed", "embeddings")


def _embeddings_table(name: str, key: list[str]) -> None:
    tenant = [sa.Column("tenant_id", sa.String(length=128), nullable=False)]
    op.create_table(
        name,
        *(tenant if "tenant_id" in key else []),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("doc_hash", sa.String(length=64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(*key, name="pk_embeddings" if "tenant_id" in key else None),
    )


def _set_jobs_primary_key(columns: list[str]) -> None:
    """Replace batch_jobs' primary key (as 0002 does): PostgreSQL drops and
    adds the constraint, SQLite recreates the table (batch mode)."""
    old = sa.inspect(op.get_bind()).get_pk_constraint("batch_jobs").get("name")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Table '_alembic_tmp_batch_jobs' specifies columns")
        with op.batch_alter_table("batch_jobs", schema=None) as batch_op:
            if old:
                batch_op.drop_constraint(old, type_="primary")
            batch_op.create_primary_key("pk_batch_jobs", columns)
