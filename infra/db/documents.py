"""Documents: load and save the domain aggregate. Every rule (staleness,
transitions, completion) lives in domain.documents.Document; this module only
maps it to the ``documents`` row."""

from __future__ import annotations

import builtins
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from domain.documents import DocKey, Document, IndexingStatus
from domain.errors import TransientError
from infra.db.database import Database, chunks, of_document, table
from infra.db.models import DatasetRow, DocumentRow

D = table(DocumentRow)
DS = table(DatasetRow)

# Document fields stored in a column of the same name (besides key and pk)
_FIELDS = (
    "version",
    "status",
    "source",
    "doc_form",
    "error",
    "content_hash",
    "mime_type",
    "uri",
    "inline_content",
    "chars",
    "segment_count",
    "tokens",
    "word_count",
    "embedded_texts",
    "cache_hits",
    "segments_added",
    "segments_kept",
    "segments_removed",
    "split_version",
    "claimed_by",
    "last_dropped",
    "enabled",
    "archived",
    "updated_at",
    "completed_at",
    "error_at",
    "parsing_started_at",
    "splitting_started_at",
    "indexing_started_at",
)
_TIMES = frozenset(f for f in _FIELDS if f.endswith("_at"))


class DocumentRepository:
    def __init__(self, database: Database, conn: Connection) -> None:
        self.db = database
        self.conn = conn

    def get(self, key: DocKey, for_update: bool = False) -> Document | None:
        """``for_update`` issues SELECT ... FOR UPDATE on PostgreSQL; on SQLite
        a write unit of work already holds the database's write lock."""
        query = select(D).where(of_document(D, key))
        if for_update:
            query = query.with_for_update()
        row = self.conn.execute(query).first()
        return _document(row) if row else None

    def get_many(self, keys: Iterable[DocKey]) -> dict[DocKey, Document]:
        by_dataset: dict[tuple[str, str], set[str]] = defaultdict(set)
        for k in keys:
            by_dataset[(k.tenant_id, k.dataset_id)].add(k.document_id)
        out: dict[DocKey, Document] = {}
        for (tenant_id, dataset_id), ids in sorted(by_dataset.items()):
            for doc in self.list(tenant_id, dataset_id, sorted(ids)):
                out[doc.key] = doc
        return out

    def add(self, document: Document) -> None:
        """Insert a new document (and its dataset, if new).

        Insert-if-absent, so two writers racing to create the same document
        never fail: on PostgreSQL the second insert waits for the first
        transaction and then inserts nothing. The loser gets the winner's row,
        locked for update, loaded into ``document`` in place, so rule methods
        called after ``add()`` are fenced against the real state. A loser that
        had already applied a rule to its new document would lose that work;
        it gets a TransientError instead and its batch is retried."""
        blank = document == Document.new(document.key)
        self.conn.execute(
            self.db.insert_ignore(DS).values(
                tenant_id=document.tenant_id, dataset_id=document.dataset_id
            )
        )
        values = _values(document)
        inserted = self.conn.execute(
            self.db.insert_ignore(D).values(
                tenant_id=document.tenant_id,
                dataset_id=document.dataset_id,
                document_id=document.document_id,
                **values,
            )
        ).rowcount
        stored = self.get(document.key, for_update=True)
        assert stored is not None  # inserted now, or by a writer that committed first
        if not (inserted or blank):
            raise TransientError(
                f"document {document.key} already exists: another writer added it first "
                "(callers get() a document before they add() it); retrying"
            )
        document.__dict__.update(stored.__dict__)  # its pk, and the column defaults

    def save(self, document: Document) -> None:
        """Write back every field of a loaded (or added) document."""
        where = D.c.id == document.pk if document.pk is not None else of_document(D, document.key)
        if not self.conn.execute(update(D).where(where).values(**_values(document))).rowcount:
            raise LookupError(f"document {document.key} is not stored; add() it first")

    def list(
        self, tenant_id: str, dataset_id: str, document_ids: Sequence[str] | None = None
    ) -> builtins.list[Document]:
        query = select(D).where(D.c.tenant_id == tenant_id, D.c.dataset_id == dataset_id)
        if document_ids is None:
            return [_document(r) for r in self.conn.execute(query.order_by(D.c.source, D.c.id))]
        out: builtins.list[Document] = []
        for chunk in chunks(sorted(set(document_ids))):
            rows = self.conn.execute(query.where(D.c.document_id.in_(chunk)))
            out.extend(_document(r) for r in rows)
        return out

    def find(self, tenant_id: str, document_id: str) -> builtins.list[Document]:
        """A document id in every dataset of the tenant that has it."""
        rows = self.conn.execute(
            select(D)
            .where(D.c.tenant_id == tenant_id, D.c.document_id == document_id)
            .order_by(D.c.dataset_id)
        )
        return [_document(r) for r in rows]

    def status_counts(self, tenant_id: str, dataset_id: str) -> dict[str, int]:
        rows = self.conn.execute(
            select(D.c.status, func.count())
            .where(D.c.tenant_id == tenant_id, D.c.dataset_id == dataset_id)
            .group_by(D.c.status)
        )
        return {str(r[0]): int(r[1]) for r in rows}


def _values(document: Document) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(document, name)
        if name == "status":
            value = IndexingStatus(value).value
        elif name in _TIMES and value is not None:
            value = _utc(value)
        out[name] = value
    if out["updated_at"] is None:
        del out["updated_at"]  # the column's default
    return out


def _document(row: Any) -> Document:
    m = row._mapping
    fields = {name: m[name] for name in _FIELDS}
    fields["status"] = IndexingStatus(fields["status"])
    fields["enabled"], fields["archived"] = bool(fields["enabled"]), bool(fields["archived"])
    for name in _TIMES:
        if fields[name] is not None:
            fields[name] = _utc(fields[name])
    return Document(
        key=DocKey(m["tenant_id"], m["dataset_id"], m["document_id"]), pk=m["id"], **fields
    )


def _utc(value: datetime) -> datetime:
    # SQLite keeps no offset: store UTC, and read it back as UTC
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
