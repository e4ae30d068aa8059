"""document aggregate: documents.last_dropped; batch jobs keyed by tenant

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 00:00:00
"""

import warnings

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_dropped", sa.Text(), nullable=True))

    # job ids are chosen by clients: (tenant_id, job_id) is the key. SQLite
    # recreates the table (batch mode); PostgreSQL alters it in place.
    _set_primary_key("pk_batch_jobs", ["tenant_id", "job_id"])


def downgrade() -> None:
    _set_primary_key("batch_jobs_pkey", ["job_id"])

    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.drop_column("last_dropped")


def _set_primary_key(name: str, columns: list[str]) -> None:
    """Replace batch_jobs' primary key: PostgreSQL drops and adds the
    constraint, SQLite recreates the table (batch mode)."""
    old = sa.inspect(op.get_bind()).get_pk_constraint("batch_jobs").get("name")
    with warnings.catch_warnings():
        # SQLite: the copy's reflected columns still say primary_key=True;
        # SQLAlchemy warns, then uses the new constraint, as intended
        warnings.filterwarnings("ignore", "Table '_alembic_tmp_batch_jobs' specifies columns")
        with op.batch_alter_table("batch_jobs", schema=None) as batch_op:
            if old:
                batch_op.drop_constraint(old, type_="primary")
            batch_op.create_primary_key(name, columns)
