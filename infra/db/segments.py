"""Segments: the rows the split stage writes and both index branches flag.
Bulk writes are one statement per chunk; ids are sorted before any update so
two writers touching overlapping rows lock them in the same order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.engine import Connection

from domain.documents import DocKey, Document
from domain.segments import ExistingSegment, Segment, SegmentDiff, StoredSegment
from infra.db.database import Database, chunks, of_document, table
from infra.db.models import DocumentRow, SegmentRow

S = table(SegmentRow)
D = table(DocumentRow)

FLAGS = frozenset({"vector_indexed", "keywords_indexed"})
# a segment one of the two branches has not finished
_UNFLAGGED = or_(S.c.vector_indexed.is_(False), S.c.keywords_indexed.is_(False))
# a segment that belongs in both indexes (its document's switches and its own)
_SEARCHABLE = and_(S.c.enabled.is_(True), D.c.enabled.is_(True), D.c.archived.is_(False))
_STORED = (
    S.c.index_node_id,
    S.c.document_id,
    S.c.doc_hash,
    S.c.position,
    S.c.tokens,
    S.c.word_count,
    S.c.vector_indexed,
    S.c.keywords_indexed,
    S.c.job_id,
    D.c.source,
    S.c.enabled,
    _SEARCHABLE.label("searchable"),
)
_TEXT = (S.c.content, S.c.answer, S.c.parent)


class SegmentRepository:
    def __init__(self, database: Database, conn: Connection) -> None:
        self.db = database
        self.conn = conn

    def existing(self, key: DocKey) -> list[ExistingSegment]:
        """The split segments of a document (imported ones left out)."""
        return self.existing_many([key])[key]

    def existing_many(self, keys: Iterable[DocKey]) -> dict[DocKey, list[ExistingSegment]]:
        """existing() for many documents, one query per dataset and chunk."""
        out: dict[DocKey, list[ExistingSegment]] = {k: [] for k in keys}
        for (tenant, dataset), ids in _by_dataset(out):
            for chunk in chunks(ids):
                rows = self.conn.execute(
                    select(
                        S.c.document_id,
                        S.c.index_node_id,
                        S.c.doc_hash,
                        S.c.position,
                        S.c.vector_indexed,
                        S.c.keywords_indexed,
                    )
                    .where(
                        S.c.tenant_id == tenant,
                        S.c.dataset_id == dataset,
                        S.c.document_id.in_(chunk),
                        S.c.job_id.is_(None),
                    )
                    .order_by(S.c.document_id, S.c.position, S.c.index_node_id)
                )
                for r in rows:
                    out[DocKey(tenant, dataset, r[0])].append(
                        ExistingSegment(r[1], r[2], r[3], bool(r[4] and r[5]))
                    )
        return out

    def replace_split(
        self,
        document: Document,
        segments: Sequence[Segment],
        diff: SegmentDiff,
        keep_removed: bool,
    ) -> tuple[int, int, int]:
        """Insert new, re-position kept, reset the flags of re-indexed, delete
        removed (unless ``keep_removed``); imported segments and kept removed
        ones stay after the split ones. Returns (segments, tokens, words)."""
        pk = self._pk(document)
        mine = S.c.document_pk == pk
        removed = set() if keep_removed else set(diff.removed)
        for chunk in chunks(sorted(removed)):
            self.conn.execute(delete(S).where(mine, S.c.index_node_id.in_(chunk)))
        existing = {
            r[0]: (r[1], r[2])
            for r in self.conn.execute(
                select(S.c.index_node_id, S.c.position, S.c.job_id).where(mine)
            )
        }
        in_split = {s.index_node_id for s in segments}
        positions = {s.index_node_id: s.position for s in segments if s.index_node_id in existing}
        leftovers = sorted(
            (i for i in existing if i not in in_split),
            key=lambda i: (existing[i][1] is not None, existing[i][0], i),
        )
        positions.update((i, len(segments) + n) for n, i in enumerate(leftovers))
        moved = {i: p for i, p in positions.items() if existing[i][0] != p}
        for chunk in chunks(sorted(moved)):
            self.conn.execute(
                update(S)
                .where(S.c.index_node_id.in_(chunk))
                .values(position=case({i: moved[i] for i in chunk}, value=S.c.index_node_id))
            )
        reindex = sorted({s.index_node_id for s in diff.to_index} & existing.keys())
        for chunk in chunks(reindex):
            self.conn.execute(
                update(S)
                .where(S.c.index_node_id.in_(chunk))
                .values(
                    version=document.version,
                    status="indexing",
                    vector_indexed=False,
                    keywords_indexed=False,
                )
            )
        new = [s for s in segments if s.index_node_id not in existing]
        self._insert(document, pk, new, job_id=None)
        if not existing:  # a first split: the totals are what was just inserted
            return len(new), sum(s.tokens for s in new), sum(s.word_count for s in new)
        totals = self.conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(S.c.tokens), 0),
                func.coalesce(func.sum(S.c.word_count), 0),
            ).where(mine)
        ).one()
        return int(totals[0]), int(totals[1]), int(totals[2])

    def append_imported(
        self, document: Document, job_id: str, segments: Sequence[Segment]
    ) -> list[Segment]:
        """Insert imported segments not there yet; returns those inserted."""
        pk = self._pk(document)
        known = set(
            self.conn.execute(select(S.c.index_node_id).where(S.c.document_pk == pk)).scalars()
        )
        fresh = [s for s in segments if s.index_node_id not in known]
        self._insert(document, pk, fresh, job_id=job_id)
        return fresh

    def delete_document(self, key: DocKey) -> list[str]:
        """Remove every segment of a document; returns their ids."""
        where = of_document(S, key)
        ids = sorted(self.conn.execute(select(S.c.index_node_id).where(where)).scalars())
        if ids:
            self.conn.execute(delete(S).where(where))
        return ids

    def delete_one(
        self, key: DocKey, index_node_id: str | None, segment_id: int | None
    ) -> StoredSegment | None:
        gone = self.find(key, index_node_id, segment_id)
        if gone is not None:
            self.conn.execute(delete(S).where(S.c.index_node_id == gone.index_node_id))
        return gone

    def mark(self, column: str, index_node_ids: Sequence[str], value: bool = True) -> int:
        """Set ``vector_indexed`` or ``keywords_indexed``."""
        if column not in FLAGS:
            raise ValueError(f"not a segment flag: {column!r}")
        n = 0
        for chunk in chunks(sorted(set(index_node_ids))):
            n += self.conn.execute(
                update(S).where(S.c.index_node_id.in_(chunk)).values({column: value})
            ).rowcount
        return n

    def alive(self, index_node_ids: Sequence[str]) -> set[str]:
        """Which of these segments still exist."""
        out: set[str] = set()
        for chunk in chunks(sorted(set(index_node_ids))):
            query = select(S.c.index_node_id).where(S.c.index_node_id.in_(chunk))
            out.update(self.conn.execute(query).scalars())
        return out

    def by_ids(self, index_node_ids: Sequence[str]) -> dict[str, StoredSegment]:
        out: dict[str, StoredSegment] = {}
        for chunk in chunks(sorted(set(index_node_ids))):
            rows = self.conn.execute(self._stored(*_TEXT).where(S.c.index_node_id.in_(chunk)))
            out.update((r.index_node_id, _stored(r)) for r in rows)
        return out

    def owners(self, index_node_ids: Sequence[str]) -> dict[str, DocKey]:
        out: dict[str, DocKey] = {}
        for chunk in chunks(sorted(set(index_node_ids))):
            rows = self.conn.execute(
                select(S.c.index_node_id, S.c.tenant_id, S.c.dataset_id, S.c.document_id).where(
                    S.c.index_node_id.in_(chunk)
                )
            )
            out.update((r[0], DocKey(r[1], r[2], r[3])) for r in rows)
        return out

    def in_dataset(
        self, tenant_id: str, dataset_id: str, index_node_ids: Sequence[str]
    ) -> dict[str, StoredSegment]:
        out: dict[str, StoredSegment] = {}
        # a disabled or archived segment never returns text, even while its
        # removal from the indexes is still on its way
        mine = (S.c.tenant_id == tenant_id, S.c.dataset_id == dataset_id, _SEARCHABLE)
        for chunk in chunks(sorted(set(index_node_ids))):
            rows = self.conn.execute(
                self._stored(*_TEXT).where(*mine, S.c.index_node_id.in_(chunk))
            )
            out.update((r.index_node_id, _stored(r)) for r in rows)
        return out

    def ids_for_document(self, key: DocKey) -> set[str]:
        """The document's segments that belong in the indexes (searchable)."""
        query = (
            select(S.c.index_node_id)
            .join(D, D.c.id == S.c.document_pk)
            .where(of_document(S, key), _SEARCHABLE)
        )
        return set(self.conn.execute(query).scalars())

    def searchable(self, index_node_ids: Sequence[str]) -> set[str]:
        """Which of these segments exist and belong in the indexes."""
        out: set[str] = set()
        for chunk in chunks(sorted(set(index_node_ids))):
            query = (
                select(S.c.index_node_id)
                .join(D, D.c.id == S.c.document_pk)
                .where(S.c.index_node_id.in_(chunk), _SEARCHABLE)
            )
            out.update(self.conn.execute(query).scalars())
        return out

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        """ids_for_document (searchable segments only) for many documents, one
        query per dataset and chunk; every key is in the answer (an empty set for
        a document without any)."""
        out: dict[DocKey, set[str]] = {k: set() for k in keys}
        for (tenant, dataset), ids in _by_dataset(out):
            for chunk in chunks(ids):
                rows = self.conn.execute(
                    select(S.c.document_id, S.c.index_node_id)
                    .join(D, D.c.id == S.c.document_pk)
                    .where(
                        S.c.tenant_id == tenant,
                        S.c.dataset_id == dataset,
                        S.c.document_id.in_(chunk),
                        _SEARCHABLE,
                    )
                )
                for document_id, index_node_id in rows:
                    out[DocKey(tenant, dataset, document_id)].add(index_node_id)
        return out

    def pending_counts(self, keys: Iterable[DocKey]) -> dict[DocKey, int]:
        """pending_count for many documents, one query per dataset and chunk."""
        out: dict[DocKey, int] = {k: 0 for k in keys}
        for (tenant, dataset), ids in _by_dataset(out):
            for chunk in chunks(ids):
                rows = self.conn.execute(
                    select(S.c.document_id, func.count())
                    .select_from(S.join(D, D.c.id == S.c.document_pk))
                    .where(
                        S.c.tenant_id == tenant,
                        S.c.dataset_id == dataset,
                        S.c.document_id.in_(chunk),
                        _UNFLAGGED,
                        _SEARCHABLE,
                    )
                    .group_by(S.c.document_id)
                )
                for document_id, n in rows:
                    out[DocKey(tenant, dataset, document_id)] = int(n)
        return out

    def pending_count(self, key: DocKey) -> int:
        """Searchable segments of a document not yet flagged by both branches
        (a disabled one is owed to no index)."""
        query = (
            select(func.count())
            .select_from(S.join(D, D.c.id == S.c.document_pk))
            .where(of_document(S, key), _UNFLAGGED, _SEARCHABLE)
        )
        return int(self.conn.execute(query).scalar() or 0)

    def find(
        self, key: DocKey, index_node_id: str | None, segment_id: int | None
    ) -> StoredSegment | None:
        """One segment of the document, by index_node_id or segment_id."""
        query = self._stored(*_TEXT).where(of_document(S, key))
        if index_node_id:
            query = query.where(S.c.index_node_id == index_node_id)
        elif segment_id is not None:
            query = query.where(S.c.id == segment_id)
        else:
            return None
        row = self.conn.execute(query).first()
        return _stored(row) if row is not None else None

    def switch(self, index_node_id: str, enabled: bool) -> None:
        """Enable or disable one segment; enabling clears its flags, since it
        goes through both branches again."""
        values: dict[str, Any] = {"enabled": enabled}
        if enabled:
            values.update(vector_indexed=False, keywords_indexed=False)
        self.conn.execute(update(S).where(S.c.index_node_id == index_node_id).values(values))

    def rewrite(self, index_node_id: str, segment: Segment, version: int) -> None:
        """Give one segment new text (segment.updated): its row, position and
        switch stay, its doc_hash and index_node_id follow the text, and both
        branches index it again."""
        self.conn.execute(
            update(S)
            .where(S.c.index_node_id == index_node_id)
            .values(
                index_node_id=segment.index_node_id,
                doc_hash=segment.doc_hash,
                content=segment.content,
                answer=segment.answer,
                tokens=segment.tokens,
                word_count=segment.word_count,
                version=version,
                status="indexing",
                vector_indexed=False,
                keywords_indexed=False,
            )
        )

    def hashes(self, key: DocKey, exclude_job: str | None = None) -> tuple[int, list[str]]:
        """(next free position, doc_hash of every segment), leaving out one
        import job's own segments (so its replay is a no-op)."""
        rows = self.conn.execute(
            select(S.c.position, S.c.doc_hash, S.c.job_id)
            .where(of_document(S, key))
            .order_by(S.c.position, S.c.index_node_id)
        ).all()
        mine = [r[1] for r in rows if exclude_job is None or r[2] != exclude_job]
        return max((r[0] for r in rows), default=-1) + 1, mine

    def for_dataset(self, tenant_id: str, dataset_id: str) -> dict[str, StoredSegment]:
        """Every segment of a dataset without its text (content is '')."""
        rows = self.conn.execute(
            self._stored().where(S.c.tenant_id == tenant_id, S.c.dataset_id == dataset_id)
        )
        return {r.index_node_id: _stored(r) for r in rows}

    def count(self, tenant_id: str, dataset_id: str) -> int:
        return self.db.count(
            S, S.c.tenant_id == tenant_id, S.c.dataset_id == dataset_id, conn=self.conn
        )

    # -- helpers -----------------------------------------------------------------

    def _pk(self, document: Document) -> int:
        if document.pk is not None:
            return document.pk
        pk = self.conn.execute(select(D.c.id).where(of_document(D, document.key))).scalar()
        if pk is None:
            raise LookupError(f"document {document.key} is not stored; add() it first")
        document.pk = int(pk)
        return document.pk

    def _insert(
        self, document: Document, pk: int, segments: Sequence[Segment], job_id: str | None
    ) -> None:
        rows = [_row(document, pk, s, job_id) for s in segments]
        for chunk in chunks(rows):
            self.conn.execute(self.db.insert_ignore(S), list(chunk))

    @staticmethod
    def _stored(*extra: Any) -> Any:
        return select(*_STORED, *extra).join(D, D.c.id == S.c.document_pk)


def _by_dataset(keys: Iterable[DocKey]) -> list[tuple[tuple[str, str], list[str]]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for k in keys:
        groups.setdefault((k.tenant_id, k.dataset_id), []).append(k.document_id)
    return [(g, sorted(ids)) for g, ids in sorted(groups.items())]


def _row(document: Document, pk: int, seg: Segment, job_id: str | None) -> dict[str, Any]:
    return {
        "document_pk": pk,
        "tenant_id": document.tenant_id,
        "dataset_id": document.dataset_id,
        "document_id": document.document_id,
        "index_node_id": seg.index_node_id,
        "doc_hash": seg.doc_hash,
        "position": seg.position,
        "content": seg.content,
        "answer": seg.answer,
        "parent": seg.parent,
        "word_count": seg.word_count,
        "tokens": seg.tokens,
        "status": "indexing",
        "vector_indexed": False,
        "keywords_indexed": False,
        "version": document.version,
        "job_id": job_id,
    }


def _stored(row: Any) -> StoredSegment:
    m = row._mapping
    return StoredSegment(
        index_node_id=m["index_node_id"],
        document_id=m["document_id"],
        doc_hash=m["doc_hash"],
        position=m["position"],
        content=m.get("content") or "",
        answer=m.get("answer"),
        parent=m.get("parent"),
        tokens=m["tokens"],
        word_count=m["word_count"],
        vector_indexed=bool(m["vector_indexed"]),
        keywords_indexed=bool(m["keywords_indexed"]),
        job_id=m["job_id"],
        source=m["source"] or "",
        enabled=bool(m["enabled"]),
        searchable=bool(m["searchable"]),
    )
