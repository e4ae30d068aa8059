"""Repositories over the database. Each public method is one transaction, so a
stage's database side effect is all-or-nothing and safe to repeat."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

from domain.documents import IndexingStatus
from domain.errors import TransientError
from domain.model import ExistingSegment, Segment, SegmentDiff
from infra.db.models import (
    BatchJobRow,
    DatasetRow,
    DocumentRow,
    EmbeddingRow,
    KeywordPostingRow,
    PayloadRow,
    SegmentRow,
)

D = DocumentRow.__table__
S = SegmentRow.__table__
E = EmbeddingRow.__table__
K = KeywordPostingRow.__table__
P = PayloadRow.__table__
DS = DatasetRow.__table__
J = BatchJobRow.__table__

_IN_CHUNK = 500  # keep IN (...) lists and bulk inserts well under driver limits


def _now() -> datetime:
    return datetime.now(UTC)


def _chunks(items: Sequence[Any], n: int = _IN_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@dataclass(frozen=True)
class DocKey:
    tenant_id: str
    dataset_id: str
    document_id: str


@dataclass(frozen=True)
class DocumentState:
    pk: int
    tenant_id: str
    dataset_id: str
    document_id: str
    source: str
    version: int
    status: IndexingStatus
    error: str | None
    content_hash: str | None
    segment_count: int
    embedded_texts: int
    cache_hits: int
    segments_added: int
    segments_kept: int
    segments_removed: int
    doc_form: str
    updated_at: datetime | None
    completed_at: datetime | None

    @property
    def key(self) -> DocKey:
        return DocKey(self.tenant_id, self.dataset_id, self.document_id)


def _doc_state(row: Any) -> DocumentState:
    return DocumentState(
        pk=row.id,
        tenant_id=row.tenant_id,
        dataset_id=row.dataset_id,
        document_id=row.document_id,
        source=row.source,
        version=row.version,
        status=IndexingStatus(row.status),
        error=row.error,
        content_hash=row.content_hash,
        segment_count=row.segment_count,
        embedded_texts=row.embedded_texts,
        cache_hits=row.cache_hits,
        segments_added=row.segments_added,
        segments_kept=row.segments_kept,
        segments_removed=row.segments_removed,
        doc_form=row.doc_form,
        updated_at=row.updated_at,
        completed_at=row.completed_at,
    )


def _of_document(table: Any, key: DocKey) -> Any:
    """Rows of one document in a table keyed by tenant, dataset and document."""
    return and_(
        table.c.tenant_id == key.tenant_id,
        table.c.dataset_id == key.dataset_id,
        table.c.document_id == key.document_id,
    )


# a segment one of the two branches has not finished
_UNFLAGGED = or_(S.c.vector_indexed.is_(False), S.c.keywords_indexed.is_(False))


def _key_clause(key: DocKey) -> Any:
    return _of_document(D, key)


class Database:
    """The engine plus a transaction helper that turns connection loss into
    TransientError, so stages retry instead of dead-lettering."""

    def __init__(self, engine: Engine) -> None:
        from infra.db.engine import create_read_engine

        self.engine = engine
        self.read_engine = create_read_engine(engine)
        self.documents = DocumentRepository(self)
        self.segments = SegmentRepository(self)
        self.embeddings = EmbeddingCache(self)
        self.postings = KeywordPostings(self)
        self.payloads = ClaimCheckStore(self)
        self.jobs = BatchJobRepository(self)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def tx(self) -> _Tx:
        return _Tx(self.engine.begin)

    def connect(self) -> _Tx:
        """A read-only connection; a lost database surfaces as TransientError."""
        return _Tx(self.read_engine.connect)

    def count(self, table: Any, *where: Any) -> int:
        """SELECT count(*) FROM table WHERE ..., on the read engine."""
        with self.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()
            )

    def insert_ignore(self, table: Any) -> Any:
        """INSERT that skips rows whose key exists: concurrent writers of the same
        row (identical chunks, redelivered batches) never deadlock or fail."""
        if self.dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        if self.dialect == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        return insert(table).prefix_with("IGNORE")

    def dispose(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


class _Tx:
    """Wraps a connection context so that losing the database (connection
    refused or dropped, deadlock, serialization failure) is a TransientError
    the runner retries, while constraint violations stay what they are."""

    def __init__(self, open_: Any) -> None:
        self._open = open_
        self._cm: Any = None

    def __enter__(self) -> Connection:
        try:
            self._cm = self._open()
            conn: Connection = self._cm.__enter__()
            return conn
        except (OperationalError, DBAPIError) as exc:
            raise TransientError(f"database unavailable: {exc.orig or exc}") from exc

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            self._cm.__exit__(exc_type, exc, tb)
        except (OperationalError, DBAPIError) as err:
            raise TransientError(f"database commit failed: {err.orig or err}") from err
        if _is_transient_db_error(exc):
            raise TransientError(f"database error: {getattr(exc, 'orig', exc)}") from exc
        return False


def _is_transient_db_error(exc: BaseException | None) -> bool:
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class DocumentRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, key: DocKey, conn: Connection | None = None) -> DocumentState | None:
        if conn is None:
            with self.db.connect() as c:
                return self.get(key, c)
        row = conn.execute(select(D).where(_key_clause(key))).first()
        return _doc_state(row) if row else None

    def versions(self, keys: Iterable[DocKey]) -> dict[DocKey, DocumentState]:
        out: dict[DocKey, DocumentState] = {}
        keys = list(set(keys))
        if not keys:
            return out
        with self.db.connect() as conn:
            for chunk in _chunks(keys):
                clause = or_(*(_key_clause(k) for k in chunk))
                for row in conn.execute(select(D).where(clause)):
                    st = _doc_state(row)
                    out[st.key] = st
        return out

    def begin_parsing(
        self,
        key: DocKey,
        version: int,
        source: str,
        doc_form: str,
        content_hash: str | None,
        mime_type: str | None,
    ) -> DocumentState | None:
        """Claim this version for processing. None means the event is stale
        (an equal-or-newer version, or a delete, already won)."""
        with self.db.tx() as conn:
            self._ensure_dataset(conn, key)
            row = conn.execute(select(D).where(_key_clause(key))).first()
            values: dict[str, Any] = {
                "source": source,
                "doc_form": doc_form,
                "version": version,
                "status": IndexingStatus.PARSING.value,
                "error": None,
                "error_at": None,
                "completed_at": None,
                "content_hash": content_hash,
                "mime_type": mime_type,
                "parsing_started_at": _now(),
                "updated_at": _now(),
            }
            if row is None:
                conn.execute(
                    insert(D).values(
                        tenant_id=key.tenant_id,
                        dataset_id=key.dataset_id,
                        document_id=key.document_id,
                        **values,
                    )
                )
            else:
                if version < row.version:
                    return None
                if row.status == IndexingStatus.DELETED.value and version <= row.version:
                    return None
                if version > row.version:
                    # a new version starts its own work counters
                    values.update(embedded_texts=0, cache_hits=0)
                conn.execute(update(D).where(D.c.id == row.id).values(**values))
            new = conn.execute(select(D).where(_key_clause(key))).one()
            return _doc_state(new)

    def _ensure_dataset(self, conn: Connection, key: DocKey) -> None:
        conn.execute(
            self.db.insert_ignore(DS).values(tenant_id=key.tenant_id, dataset_id=key.dataset_id)
        )

    def set_status(
        self,
        key: DocKey,
        version: int,
        status: IndexingStatus,
        error: str | None = None,
        **extra: Any,
    ) -> bool:
        """Move the document to ``status`` if ``version`` is still current."""
        values: dict[str, Any] = {"status": status.value, "updated_at": _now(), **extra}
        if status is IndexingStatus.ERROR:
            values.update(error=(error or "unknown error")[:4000], error_at=_now())
        elif status is IndexingStatus.SPLITTING:
            values["splitting_started_at"] = _now()
        elif status is IndexingStatus.COMPLETED:
            values["completed_at"] = _now()
        with self.db.tx() as conn:
            res = conn.execute(
                update(D)
                .where(_key_clause(key), D.c.version == version, D.c.status != "deleted")
                .values(**values)
            )
            return bool(res.rowcount)

    def mark_error_any_version(self, key: DocKey, reason: str) -> None:
        """For events that failed before we learned their version."""
        with self.db.tx() as conn:
            conn.execute(
                update(D)
                .where(_key_clause(key), D.c.status.notin_(["deleted", "completed"]))
                .values(status="error", error=reason[:4000], error_at=_now(), updated_at=_now())
            )

    def apply_split(
        self,
        key: DocKey,
        version: int,
        segments: Sequence[Segment],
        diff: SegmentDiff,
        chars: int,
        keep_removed: bool = False,
    ) -> DocumentState | None:
        """Replace the document's segment set in one transaction: insert new,
        re-position kept, delete removed (unless ``keep_removed``). Segments
        from batch imports are not in the source and stay, after the split
        ones. Returns None if the version is stale."""
        with self.db.tx() as conn:
            row = conn.execute(select(D).where(_key_clause(key)).with_for_update()).first()
            if row is None or row.version != version or row.status == "deleted":
                return None
            doc_pk = row.id
            removed = [] if keep_removed else list(diff.removed)
            for chunk in _chunks(removed):
                conn.execute(delete(S).where(S.c.index_node_id.in_(chunk)))
            existing = {
                r.index_node_id: r
                for r in conn.execute(
                    select(S.c.index_node_id, S.c.position, S.c.job_id).where(
                        S.c.document_pk == doc_pk
                    )
                )
            }
            reindex = {s.index_node_id for s in diff.to_index}
            new_rows = []
            for seg in segments:
                old = existing.get(seg.index_node_id)
                if old is None:
                    new_rows.append(self._segment_values(key, doc_pk, version, seg))
                elif seg.index_node_id in reindex:
                    conn.execute(
                        update(S)
                        .where(S.c.index_node_id == seg.index_node_id)
                        .values(position=seg.position, version=version, status="indexing")
                    )
                elif old.position != seg.position:
                    conn.execute(
                        update(S)
                        .where(S.c.index_node_id == seg.index_node_id)
                        .values(position=seg.position)
                    )
            in_split = {s.index_node_id for s in segments}
            leftovers = sorted(
                (r for i, r in existing.items() if i not in in_split and i not in removed),
                key=lambda r: (r.job_id is not None, r.position),
            )
            for offset, r in enumerate(leftovers):
                if r.position != len(segments) + offset:
                    conn.execute(
                        update(S)
                        .where(S.c.index_node_id == r.index_node_id)
                        .values(position=len(segments) + offset)
                    )
            for chunk in _chunks(new_rows):
                conn.execute(self.db.insert_ignore(S), list(chunk))
            totals = conn.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(S.c.tokens), 0),
                    func.coalesce(func.sum(S.c.word_count), 0),
                ).where(S.c.document_pk == doc_pk)
            ).one()
            # removals still have to reach Milvus and the postings: completion
            # waits for them (track_status checks both stores)
            done = not diff.to_index and not removed
            counters: dict[str, Any] = {}
            if row.split_version != version:
                counters = {
                    "segments_added": diff.added_count,
                    "segments_kept": diff.kept_count,
                    "segments_removed": len(removed),
                    "split_version": version,
                }
            extra: dict[str, Any] = {}
            if keep_removed and diff.removed:
                # vanished segments were kept on purpose; forget the file hash so
                # the next incremental sync updates this document and drops them
                extra["content_hash"] = None
            conn.execute(
                update(D)
                .where(D.c.id == doc_pk)
                .values(
                    **extra,
                    status=(IndexingStatus.COMPLETED if done else IndexingStatus.INDEXING).value,
                    chars=chars,
                    segment_count=totals[0],
                    tokens=totals[1],
                    word_count=totals[2],
                    **counters,
                    indexing_started_at=_now(),
                    completed_at=_now() if done else None,
                    updated_at=_now(),
                )
            )
            return _doc_state(conn.execute(select(D).where(D.c.id == doc_pk)).one())

    def record_delete(self, key: DocKey, version: int) -> bool:
        """Tombstone: the document is deleted as of ``version``; older events
        for it are dropped from now on. False if a newer version exists."""
        with self.db.tx() as conn:
            self._ensure_dataset(conn, key)
            row = conn.execute(select(D).where(_key_clause(key)).with_for_update()).first()
            if row is None:
                conn.execute(
                    insert(D).values(
                        tenant_id=key.tenant_id,
                        dataset_id=key.dataset_id,
                        document_id=key.document_id,
                        source="",
                        version=version,
                        status="deleted",
                    )
                )
                return True
            if version < row.version:
                return False
            conn.execute(
                update(D)
                .where(D.c.id == row.id)
                .values(status="deleted", version=version, error=None, updated_at=_now())
            )
            return True

    def delete_segments(self, key: DocKey, version: int) -> list[str] | None:
        """Remove every segment row of a document deleted at ``version``."""
        with self.db.tx() as conn:
            row = conn.execute(select(D).where(_key_clause(key)).with_for_update()).first()
            if row is None or row.status != "deleted" or row.version != version:
                return None
            ids = [
                r[0]
                for r in conn.execute(select(S.c.index_node_id).where(S.c.document_pk == row.id))
            ]
            conn.execute(delete(S).where(S.c.document_pk == row.id))
            conn.execute(
                update(D)
                .where(D.c.id == row.id)
                .values(
                    segments_removed=len(ids),
                    segment_count=0,
                    tokens=0,
                    word_count=0,
                    segments_added=0,
                    segments_kept=0,
                )
            )
            conn.execute(
                update(J)
                .where(
                    _of_document(J, key),
                    J.c.status.in_(["waiting", "processing"]),
                )
                .values(status="error", error="the document was deleted", updated_at=_now())
            )
            return ids

    def delete_segment(
        self, key: DocKey, version: int, index_node_id: str | None, segment_id: int | None
    ) -> str | None:
        """Remove one segment; the document keeps its status."""
        with self.db.tx() as conn:
            row = conn.execute(select(D).where(_key_clause(key)).with_for_update()).first()
            if row is None or row.status == "deleted" or version < row.version:
                return None
            q = select(S.c.index_node_id, S.c.tokens, S.c.word_count).where(
                S.c.document_pk == row.id
            )
            q = (
                q.where(S.c.index_node_id == index_node_id)
                if index_node_id
                else q.where(S.c.id == segment_id)
            )
            seg = conn.execute(q).first()
            if seg is None:
                return None
            conn.execute(delete(S).where(S.c.index_node_id == seg.index_node_id))
            conn.execute(
                update(D)
                .where(D.c.id == row.id)
                .values(
                    segment_count=D.c.segment_count - 1,
                    tokens=D.c.tokens - seg.tokens,
                    word_count=D.c.word_count - seg.word_count,
                    updated_at=_now(),
                )
            )
            return str(seg.index_node_id)

    def import_segments(
        self, key: DocKey, version: int, job_id: str, segments: Sequence[Segment]
    ) -> list[Segment] | None:
        """Append batch-imported segments after the document's last position."""
        with self.db.tx() as conn:
            row = conn.execute(select(D).where(_key_clause(key)).with_for_update()).first()
            if row is None or row.status == "deleted" or version < row.version:
                return None
            rows = []
            fresh = []
            known = {
                r[0]
                for r in conn.execute(select(S.c.index_node_id).where(S.c.document_pk == row.id))
            }
            for seg in segments:
                if seg.index_node_id in known:
                    continue  # a replayed import
                v = self._segment_values(key, row.id, row.version, seg)
                v["job_id"] = job_id
                rows.append(v)
                fresh.append(seg)
            for chunk in _chunks(rows):
                conn.execute(self.db.insert_ignore(S), list(chunk))
            if fresh:
                conn.execute(
                    update(D)
                    .where(D.c.id == row.id)
                    .values(
                        status=IndexingStatus.INDEXING.value,
                        segment_count=D.c.segment_count + len(fresh),
                        tokens=D.c.tokens + sum(s.tokens for s in fresh),
                        word_count=D.c.word_count + sum(s.word_count for s in fresh),
                        completed_at=None,
                        updated_at=_now(),
                    )
                )
            conn.execute(
                update(J)
                .where(J.c.job_id == job_id)
                .values(
                    status="processing" if fresh else "completed",
                    completed=0 if fresh else J.c.total,
                    updated_at=_now(),
                )
            )
            return fresh

    def segment_hashes(self, key: DocKey, exclude_job: str | None = None) -> tuple[int, list[str]]:
        """(next free position, doc_hash of every segment) of a document,
        leaving out one import job's own segments (so its replay is a no-op)."""
        with self.db.connect() as conn:
            q = select(S.c.position, S.c.doc_hash, S.c.job_id).join(D, D.c.id == S.c.document_pk)
            rows = conn.execute(q.where(_key_clause(key))).all()
        mine = [r for r in rows if exclude_job is None or r[2] != exclude_job]
        return (max((r[0] for r in rows), default=-1) + 1, [r[1] for r in mine])

    @staticmethod
    def _segment_values(key: DocKey, doc_pk: int, version: int, seg: Segment) -> dict[str, Any]:
        return {
            "document_pk": doc_pk,
            "tenant_id": key.tenant_id,
            "dataset_id": key.dataset_id,
            "document_id": key.document_id,
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
            "version": version,
            "job_id": None,
        }

    def add_embedding_counts(self, counts: dict[tuple[DocKey, int], tuple[int, int]]) -> None:
        if not counts:
            return
        with self.db.tx() as conn:
            for (key, version), (embedded, hits) in counts.items():
                conn.execute(
                    update(D)
                    # imports carry a newer version than the document they extend
                    .where(_key_clause(key), D.c.version <= version)
                    .values(
                        embedded_texts=D.c.embedded_texts + embedded,
                        cache_hits=D.c.cache_hits + hits,
                    )
                )

    def try_complete(self, key: DocKey, version: int) -> IndexingStatus | None:
        """Completed once both branches have every segment of this version."""
        with self.db.tx() as conn:
            row = conn.execute(select(D).where(_key_clause(key))).first()
            if row is None or row.version != version:
                return None
            if row.status != IndexingStatus.INDEXING.value:
                return IndexingStatus(row.status)
            pending = conn.execute(
                select(func.count()).select_from(S).where(S.c.document_pk == row.id, _UNFLAGGED)
            ).scalar_one()
            if pending:
                return IndexingStatus.INDEXING
            conn.execute(
                update(D)
                .where(D.c.id == row.id)
                .values(status="completed", completed_at=_now(), updated_at=_now())
            )
            conn.execute(
                update(S)
                .where(S.c.document_pk == row.id, S.c.status != "completed")
                .values(status="completed")
            )
            conn.execute(
                update(J)
                .where(
                    _of_document(J, key),
                    J.c.status == "processing",
                )
                .values(status="completed", completed=J.c.total, updated_at=_now())
            )
            return IndexingStatus.COMPLETED

    def list(
        self, tenant_id: str, dataset_id: str, document_ids: Sequence[str] | None = None
    ) -> list[DocumentState]:
        q = select(D).where(D.c.tenant_id == tenant_id, D.c.dataset_id == dataset_id)
        with self.db.connect() as conn:
            if document_ids is None:
                return [_doc_state(r) for r in conn.execute(q.order_by(D.c.source))]
            out = []
            for chunk in _chunks(list(document_ids)):
                out.extend(_doc_state(r) for r in conn.execute(q.where(D.c.document_id.in_(chunk))))
            return out

    def find(self, tenant_id: str, document_id: str) -> list[DocumentState]:
        """A document id in every dataset of the tenant that has it."""
        with self.db.connect() as conn:
            rows = conn.execute(
                select(D).where(D.c.tenant_id == tenant_id, D.c.document_id == document_id)
            )
            return [_doc_state(r) for r in rows]

    def status_counts(self, tenant_id: str, dataset_id: str) -> dict[str, int]:
        with self.db.connect() as conn:
            rows = conn.execute(
                select(D.c.status, func.count())
                .where(D.c.tenant_id == tenant_id, D.c.dataset_id == dataset_id)
                .group_by(D.c.status)
            )
            return {r[0]: r[1] for r in rows}


class SegmentRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def existing(self, key: DocKey) -> list[ExistingSegment]:
        with self.db.connect() as conn:
            rows = conn.execute(
                select(
                    S.c.index_node_id,
                    S.c.doc_hash,
                    S.c.position,
                    S.c.vector_indexed,
                    S.c.keywords_indexed,
                )
                .join(D, D.c.id == S.c.document_pk)
                .where(_key_clause(key), S.c.job_id.is_(None))
            )
            return [
                ExistingSegment(
                    r.index_node_id,
                    r.doc_hash,
                    r.position,
                    bool(r.vector_indexed and r.keywords_indexed),
                )
                for r in rows
            ]

    def mark(self, column: str, index_node_ids: Sequence[str], value: bool = True) -> int:
        """Set vector_indexed or keywords_indexed. Sorted order: two stages
        updating overlapping rows lock them in the same order (no deadlock)."""
        col = S.c[column]
        n = 0
        ids = sorted(set(index_node_ids))
        with self.db.tx() as conn:
            for chunk in _chunks(ids):
                n += conn.execute(
                    update(S).where(S.c.index_node_id.in_(chunk)).values({col: value})
                ).rowcount
        return n

    def by_ids(self, index_node_ids: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self.db.connect() as conn:
            for chunk in _chunks(list(index_node_ids)):
                for r in conn.execute(
                    select(S, D.c.source)
                    .join(D, D.c.id == S.c.document_pk)
                    .where(S.c.index_node_id.in_(chunk))
                ):
                    out[r.index_node_id] = r
        return out

    def existing_ids(self, index_node_ids: Sequence[str]) -> set[str]:
        """Which of these segments still exist (the cheap form of by_ids)."""
        out: set[str] = set()
        with self.db.connect() as conn:
            for chunk in _chunks(sorted(set(index_node_ids))):
                out.update(
                    r[0]
                    for r in conn.execute(
                        select(S.c.index_node_id).where(S.c.index_node_id.in_(chunk))
                    )
                )
        return out

    def pending_count(self, key: DocKey) -> int:
        """Segments of a document not yet flagged by both branches."""
        return self.db.count(S, _of_document(S, key), _UNFLAGGED)

    def ids_for_document(self, key: DocKey) -> set[str]:
        with self.db.connect() as conn:
            rows = conn.execute(
                select(S.c.index_node_id).where(
                    _of_document(S, key),
                )
            )
            return {r[0] for r in rows}

    def rows_for_dataset(
        self, tenant_id: str, dataset_id: str
    ) -> dict[str, tuple[str, bool, bool]]:
        """index_node_id -> (document_id, vector_indexed, keywords_indexed)."""
        with self.db.connect() as conn:
            rows = conn.execute(
                select(
                    S.c.index_node_id, S.c.document_id, S.c.vector_indexed, S.c.keywords_indexed
                ).where(S.c.tenant_id == tenant_id, S.c.dataset_id == dataset_id)
            )
            return {r[0]: (r[1], bool(r[2]), bool(r[3])) for r in rows}

    def ids_for_dataset(self, tenant_id: str, dataset_id: str) -> dict[str, str]:
        """index_node_id -> document_id for every segment of a dataset."""
        with self.db.connect() as conn:
            rows = conn.execute(
                select(S.c.index_node_id, S.c.document_id).where(
                    S.c.tenant_id == tenant_id, S.c.dataset_id == dataset_id
                )
            )
            return {r[0]: r[1] for r in rows}

    def count(self, tenant_id: str, dataset_id: str) -> int:
        return self.db.count(S, S.c.tenant_id == tenant_id, S.c.dataset_id == dataset_id)

    def delete_ids(self, index_node_ids: Sequence[str]) -> int:
        n = 0
        with self.db.tx() as conn:
            for chunk in _chunks(sorted(index_node_ids)):
                n += conn.execute(delete(S).where(S.c.index_node_id.in_(chunk))).rowcount
        return n


class EmbeddingCache:
    """(provider, model, doc_hash) -> vector; stored as float32 bytes, never pickled."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get_many(
        self, provider: str, model: str, doc_hashes: Iterable[str]
    ) -> dict[str, np.ndarray]:
        hashes = sorted(set(doc_hashes))
        out: dict[str, np.ndarray] = {}
        with self.db.connect() as conn:
            for chunk in _chunks(hashes):
                rows = conn.execute(
                    select(E.c.doc_hash, E.c.vector).where(
                        E.c.provider == provider, E.c.model == model, E.c.doc_hash.in_(chunk)
                    )
                )
                for h, blob in rows:
                    out[h] = np.frombuffer(blob, dtype="<f4")
        return out

    def put_many(self, provider: str, model: str, vectors: dict[str, Sequence[float]]) -> None:
        rows = [
            {
                "provider": provider,
                "model": model,
                "doc_hash": h,
                "dim": len(v),
                "vector": np.asarray(v, dtype="<f4").tobytes(),
            }
            for h, v in sorted(vectors.items())
        ]
        with self.db.tx() as conn:
            for chunk in _chunks(rows):
                conn.execute(self.db.insert_ignore(E), list(chunk))

    def count(self, provider: str | None = None, model: str | None = None) -> int:
        where = [E.c.provider == provider] if provider else []
        if model:
            where.append(E.c.model == model)
        return self.db.count(E, *where)


class KeywordPostings:
    """(tenant, dataset, keyword, index_node_id, weight): one row per posting,
    so a change touches only its own segments' rows."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def replace(
        self,
        tenant_id: str,
        dataset_id: str,
        postings: dict[tuple[str, str], list[tuple[str, float]]],
    ) -> None:
        """postings: (index_node_id, document_id) -> [(keyword, weight)]."""
        ids = sorted({node for node, _ in postings})
        rows = [
            {
                "tenant_id": tenant_id,
                "dataset_id": dataset_id,
                "keyword": kw,
                "index_node_id": node,
                "document_id": doc,
                "weight": float(w),
            }
            for (node, doc), kws in sorted(postings.items())
            for kw, w in kws
        ]
        with self.db.tx() as conn:
            for chunk in _chunks(ids):
                conn.execute(delete(K).where(K.c.index_node_id.in_(chunk)))
            for chunk in _chunks(rows):
                conn.execute(self.db.insert_ignore(K), list(chunk))

    def delete_nodes(self, index_node_ids: Sequence[str]) -> int:
        n = 0
        with self.db.tx() as conn:
            for chunk in _chunks(sorted(set(index_node_ids))):
                n += conn.execute(delete(K).where(K.c.index_node_id.in_(chunk))).rowcount
        return n

    def delete_document_orphans(self, key: DocKey) -> int:
        """Postings of a document whose segment no longer exists."""
        with self.db.tx() as conn:
            alive = select(S.c.index_node_id).where(
                _of_document(S, key),
            )
            return int(
                conn.execute(
                    delete(K).where(
                        _of_document(K, key),
                        K.c.index_node_id.notin_(alive),
                    )
                ).rowcount
            )

    def search(
        self, tenant_id: str, dataset_id: str, keywords: dict[str, float], limit: int
    ) -> list[tuple[str, float]]:
        if not keywords:
            return []
        with self.db.connect() as conn:
            rows = conn.execute(
                select(K.c.index_node_id, K.c.keyword, K.c.weight).where(
                    K.c.tenant_id == tenant_id,
                    K.c.dataset_id == dataset_id,
                    K.c.keyword.in_(list(keywords)),
                )
            )
            scores: dict[str, float] = {}
            for node, kw, weight in rows:
                scores[node] = scores.get(node, 0.0) + weight * keywords[kw]
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]

    def count(self, tenant_id: str, dataset_id: str) -> int:
        return self.db.count(K, K.c.tenant_id == tenant_id, K.c.dataset_id == dataset_id)

    def nodes_for_document(self, key: DocKey) -> set[str]:
        with self.db.connect() as conn:
            rows = conn.execute(
                select(K.c.index_node_id)
                .where(
                    _of_document(K, key),
                )
                .distinct()
            )
            return {r[0] for r in rows}

    def document_of(self, index_node_id: str) -> str | None:
        with self.db.connect() as conn:
            row = conn.execute(
                select(K.c.document_id).where(K.c.index_node_id == index_node_id).limit(1)
            ).first()
            return str(row[0]) if row else None

    def count_document(self, key: DocKey) -> int:
        return self.db.count(K, _of_document(K, key))

    def nodes(self, tenant_id: str, dataset_id: str) -> dict[str, int]:
        """index_node_id -> number of postings, for verification."""
        with self.db.connect() as conn:
            rows = conn.execute(
                select(K.c.index_node_id, func.count())
                .where(K.c.tenant_id == tenant_id, K.c.dataset_id == dataset_id)
                .group_by(K.c.index_node_id)
            )
            return {r[0]: r[1] for r in rows}


def _has_prefix(column: Any, prefix: str) -> Any:
    # exact and case-sensitive on every dialect, unlike LIKE ('_' and '%' are
    # wildcards, and SQLite's LIKE ignores case)
    return func.substr(column, 1, len(prefix)) == prefix


class ClaimCheckStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, key: str, data: bytes, replace_prefix: str | None = None) -> None:
        with self.db.tx() as conn:
            if replace_prefix:
                conn.execute(delete(P).where(_has_prefix(P.c.key, replace_prefix), P.c.key != key))
            conn.execute(delete(P).where(P.c.key == key))
            conn.execute(insert(P).values(key=key, data=data))

    def get(self, key: str) -> bytes | None:
        with self.db.connect() as conn:
            row = conn.execute(select(P.c.data).where(P.c.key == key)).first()
            return bytes(row[0]) if row else None

    def delete_prefix(self, prefix: str) -> None:
        with self.db.tx() as conn:
            conn.execute(delete(P).where(_has_prefix(P.c.key, prefix)))


class BatchJobRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, job_id: str, key: DocKey, total: int) -> None:
        with self.db.tx() as conn:
            conn.execute(
                self.db.insert_ignore(J).values(
                    job_id=job_id,
                    tenant_id=key.tenant_id,
                    dataset_id=key.dataset_id,
                    document_id=key.document_id,
                    status="waiting",
                    total=total,
                    completed=0,
                )
            )

    def fail(self, job_id: str, reason: str) -> None:
        with self.db.tx() as conn:
            conn.execute(
                update(J)
                .where(J.c.job_id == job_id)
                .values(status="error", error=reason[:4000], updated_at=_now())
            )

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.db.connect() as conn:
            row = conn.execute(select(J).where(J.c.job_id == job_id)).first()
            return dict(row._mapping) if row else None


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)
