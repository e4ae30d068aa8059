"""Which datasets a tenant has: read by front ends (the HTTP API) through
kbstream/queries.py, never by querying the tables themselves."""

from __future__ import annotations

from sqlalchemy import select, union

from infra.db.database import Database
from infra.db.models import DatasetRow, DocumentRow


def dataset_names(database: Database, tenant_id: str) -> list[str]:
    """Every dataset of the tenant: registered (kbstream dataset create) or
    holding documents, in one statement."""
    query = union(
        select(DatasetRow.dataset_id).where(DatasetRow.tenant_id == tenant_id),
        select(DocumentRow.dataset_id).where(DocumentRow.tenant_id == tenant_id),
    )
    with database.connect() as conn:
        return sorted({r[0] for r in conn.execute(query)})
