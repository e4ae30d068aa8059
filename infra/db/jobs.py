"""Batch-import jobs, keyed by (tenant, job_id): two tenants may both call a
job "import-1"."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from domain.documents import MAX_ERROR_CHARS, DocKey
from infra.db.database import Database, of_document, table, utcnow
from infra.db.models import BatchJobRow

J = table(BatchJobRow)


class ImportJobs:
    def __init__(self, database: Database, conn: Connection) -> None:
        self.db = database
        self.conn = conn

    def create(self, key: DocKey, job_id: str, total: int) -> None:
        """A replayed create changes nothing."""
        self.conn.execute(
            self.db.insert_ignore(J).values(
                tenant_id=key.tenant_id,
                job_id=job_id,
                dataset_id=key.dataset_id,
                document_id=key.document_id,
                status="waiting",
                total=total,
                completed=0,
            )
        )

    def processing(self, tenant_id: str, job_id: str, fresh: int) -> None:
        """Segments were appended (``fresh`` new ones; 0 completes the job)."""
        self._set(
            self._job(tenant_id, job_id),
            status="processing" if fresh else "completed",
            completed=0 if fresh else J.c.total,
        )

    def fail(self, tenant_id: str, job_id: str, reason: str) -> None:
        self._set(self._job(tenant_id, job_id), status="error", error=reason[:MAX_ERROR_CHARS])

    def complete_for_document(self, key: DocKey) -> None:
        """The document completed: so did its jobs still processing."""
        self._set(
            (of_document(J, key), J.c.status == "processing"),
            status="completed",
            completed=J.c.total,
        )

    def fail_for_document(self, key: DocKey, reason: str) -> None:
        """The document was deleted: its unfinished jobs fail."""
        self._set(
            (of_document(J, key), J.c.status.in_(["waiting", "processing"])),
            status="error",
            error=reason[:MAX_ERROR_CHARS],
        )

    def get(self, tenant_id: str, job_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(select(J).where(*self._job(tenant_id, job_id))).first()
        return dict(row._mapping) if row else None

    @staticmethod
    def _job(tenant_id: str, job_id: str) -> tuple[Any, ...]:
        return J.c.tenant_id == tenant_id, J.c.job_id == job_id

    def _set(self, where: tuple[Any, ...], **values: Any) -> None:
        self.conn.execute(update(J).where(*where).values(updated_at=utcnow(), **values))
