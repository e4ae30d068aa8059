"""Documents: load and save the domain aggregate. Every rule (staleness,
transitions, completion) lives in domain.documents.Document; this module only
maps it to the ``documents`` row."""

from __future__ import annotations

import builtins
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection

from domain.documents import DocKey, Document, IndexingStatus
from domain.errors import TransientError
from infra.db.database import Database, chunks, table
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

# Statements built once: building and cache-keying a fresh SELECT/UPDATE of 27
# columns per call cost more than running it (issue 17's profile). Parameters
# are bound per call (and per row, for executemany).
_KEY_PARAMS = (
    D.c.tenant_id == bindparam("k_tenant"),
    D.c.dataset_id == bindparam("k_dataset"),
    D.c.document_id == bindparam("k_document"),
)
_GET = select(D).where(*_KEY_PARAMS)
_GET_FOR_UPDATE = _GET.with_for_update()
_SAVE_VALUES: dict[str, Any] = {
    name: bindparam(f"v_{name}", type_=D.c[name].type) for name in _FIELDS
}
# None keeps the column's own on-update value, as an UPDATE without it would
_SAVE_VALUES["updated_at"] = func.coalesce(_SAVE_VALUES["updated_at"], func.now())
_SAVE_BY_PK = update(D).where(D.c.id == bindparam("k_pk")).values(_SAVE_VALUES)
_SAVE_BY_KEY = update(D).where(*_KEY_PARAMS).values(_SAVE_VALUES)


class DocumentRepository:
    def __init__(self, database: Database, conn: Connection) -> None:
        self.db = database
        self.conn = conn

    def get(self, key: DocKey, for_update: bool = False) -> Document | None:
        """``for_update`` issues SELECT ... FOR UPDATE on PostgreSQL; on SQLite
        a write unit of work already holds the database's write lock."""
        query = _GET_FOR_UPDATE if for_update else _GET
        row = self.conn.execute(query, _key_params(key)).first()
        return _document(row) if row else None

    def get_many(self, keys: Iterable[DocKey], for_update: bool = False) -> dict[DocKey, Document]:
        """One query per dataset (and IN chunk). ``for_update`` locks the rows
        on PostgreSQL in id order, one order for every writer of many rows."""
        by_dataset: dict[tuple[str, str], set[str]] = defaultdict(set)
        for k in keys:
            by_dataset[(k.tenant_id, k.dataset_id)].add(k.document_id)
        out: dict[DocKey, Document] = {}
        for (tenant_id, dataset_id), ids in sorted(by_dataset.items()):
            query = select(D).where(D.c.tenant_id == tenant_id, D.c.dataset_id == dataset_id)
            for chunk in chunks(sorted(ids)):
                chosen = query.where(D.c.document_id.in_(chunk))
                if for_update:
                    chosen = chosen.order_by(D.c.id).with_for_update()
                for row in self.conn.execute(chosen):
                    doc = _document(row)
                    out[doc.key] = doc
        return out

    def add_many(self, documents: Sequence[Document]) -> None:
        """Insert-if-absent, in one statement: for documents a stage is about to
        create. Unlike add(), nothing is read back (get_many(..., for_update=True)
        after it), and a row a concurrent writer inserted first simply stays:
        the caller applies its rules to what it reads."""
        if not documents:
            return
        datasets = sorted({(d.tenant_id, d.dataset_id) for d in documents})
        self.conn.execute(
            self.db.insert_ignore(DS),
            [{"tenant_id": t, "dataset_id": d} for t, d in datasets],
        )
        rows = []
        for document in sorted(documents, key=lambda d: str(d.key)):
            values = _values(document)
            values.setdefault("updated_at", datetime.now(UTC))
            rows.append(
                {
                    "tenant_id": document.tenant_id,
                    "dataset_id": document.dataset_id,
                    "document_id": document.document_id,
                    **values,
                }
            )
        self.conn.execute(self.db.insert_ignore(D), rows)

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
        query = _SAVE_BY_PK if document.pk is not None else _SAVE_BY_KEY
        if not self.conn.execute(query, _save_params(document)).rowcount:
            raise LookupError(f"document {document.key} is not stored; add() it first")

    def save_many(self, documents: Sequence[Document]) -> None:
        """save() for many loaded documents in one executemany, in id order
        (the lock order of get_many(for_update=True))."""
        loaded = [d for d in documents if d.pk is not None]
        for d in documents:
            if d.pk is None:
                self.save(d)
        if loaded:
            ordered = sorted(loaded, key=lambda d: d.pk or 0)
            self.conn.execute(_SAVE_BY_PK, [_save_params(d) for d in ordered])

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


def _key_params(key: DocKey) -> dict[str, Any]:
    return {"k_tenant": key.tenant_id, "k_dataset": key.dataset_id, "k_document": key.document_id}


def _save_params(document: Document) -> dict[str, Any]:
    values = _values(document)
    params = {f"v_{name}": values.get(name) for name in _FIELDS}
    params.update(_key_params(document.key), k_pk=document.pk)
    return params


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
