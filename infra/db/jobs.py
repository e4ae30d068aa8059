"""Batch-import jobs, keyed by (tenant, dataset, document, job_id): job ids
are chosen by clients, so two tenants, datasets or documents may all call a
job "import-1", and none of them may touch another's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection

from domain.documents import MAX_ERROR_CHARS, DocKey
from infra.db.database import Database, chunks, of_document, table, utcnow
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

    def processing(self, key: DocKey, job_id: str, fresh: int) -> None:
        """Segments were appended (``fresh`` new ones; 0 completes the job)."""
        self._set(
            self._job(key, job_id),
            status="processing" if fresh else "completed",
            completed=0 if fresh else J.c.total,
        )

    def fail(self, key: DocKey, job_id: str, reason: str) -> None:
        self._set(self._job(key, job_id), status="error", error=reason[:MAX_ERROR_CHARS])

    def complete_for_document(self, key: DocKey) -> None:
        """The document completed: so did its jobs still processing."""
        self._set(
            (of_document(J, key), J.c.status == "processing"),
            status="completed",
            completed=J.c.total,
        )

    def complete_for_documents(self, keys: Sequence[DocKey]) -> None:
        """complete_for_document for many documents, one statement per dataset
        and chunk."""
        groups: dict[tuple[str, str], list[str]] = {}
        for k in keys:
            groups.setdefault((k.tenant_id, k.dataset_id), []).append(k.document_id)
        for (tenant, dataset), ids in sorted(groups.items()):
            for chunk in chunks(sorted(set(ids))):
                self._set(
                    (
                        J.c.tenant_id == tenant,
                        J.c.dataset_id == dataset,
                        J.c.document_id.in_(chunk),
                        J.c.status == "processing",
                    ),
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

    def get(self, key: DocKey, job_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(select(J).where(*self._job(key, job_id))).first()
        return dict(row._mapping) if row else None

    def find(
        self, tenant_id: str, job_id: str, dataset_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The tenant's jobs called ``job_id`` (in one dataset, if given)."""
        query = select(J).where(J.c.tenant_id == tenant_id, J.c.job_id == job_id)
        if dataset_id is not None:
            query = query.where(J.c.dataset_id == dataset_id)
        rows = self.conn.execute(query.order_by(J.c.dataset_id, J.c.document_id))
        return [dict(r._mapping) for r in rows]

    def delete(
        self, tenant_id: str, dataset_id: str, document_ids: Sequence[str] | None = None
    ) -> int:
        """Remove the job records of some documents of a dataset (all of them
        without ``document_ids``), one statement per chunk of documents;
        returns how many went."""
        query = delete(J).where(J.c.tenant_id == tenant_id, J.c.dataset_id == dataset_id)
        if document_ids is None:
            return int(self.conn.execute(query).rowcount or 0)
        return sum(
            int(self.conn.execute(query.where(J.c.document_id.in_(chunk))).rowcount or 0)
            for chunk in chunks(sorted(set(document_ids)))
        )

    @staticmethod
    def _job(key: DocKey, job_id: str) -> tuple[Any, ...]:
        return of_document(J, key), J.c.job_id == job_id

    def _set(self, where: tuple[Any, ...], **values: Any) -> None:
        self.conn.execute(update(J).where(*where).values(updated_at=utcnow(), **values))
