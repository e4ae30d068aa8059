"""The in-memory repositories: each reads and writes the state of the unit
of work it belongs to (tests.fakes.unit_of_work)."""

from __future__ import annotations

import builtins
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from domain.documents import DocKey, Document
from domain.segments import ExistingSegment, Segment, SegmentDiff, StoredSegment
from domain.vector_indexes import IndexState, VectorIndexRecord
from tests.fakes.state import FLAGS, MAX_ERROR_CHARS, _now, _SegmentRow

if TYPE_CHECKING:
    from tests.fakes.unit_of_work import InMemoryUnitOfWork


class _Repo:
    def __init__(self, uow: InMemoryUnitOfWork) -> None:
        self.uow = uow


def _of(key: DocKey, tenant_id: str, dataset_id: str, document_id: str | None = None) -> bool:
    return (
        key.tenant_id == tenant_id
        and key.dataset_id == dataset_id
        and (document_id is None or key.document_id == document_id)
    )


# -- documents ----------------------------------------------------------------------


class _Documents(_Repo):
    def get(self, key: DocKey, for_update: bool = False) -> Document | None:
        doc = self.uow.state.documents.get(key)
        return doc.copy() if doc else None

    def get_many(self, keys: Iterable[DocKey], for_update: bool = False) -> dict[DocKey, Document]:
        docs = self.uow.state.documents
        return {k: docs[k].copy() for k in set(keys) if k in docs}

    def add_many(self, documents: Sequence[Document]) -> None:
        for document in documents:
            self.add(document)

    def add(self, document: Document) -> None:
        state = self.uow.writable()
        state.datasets.setdefault((document.tenant_id, document.dataset_id), True)
        if document.key in state.documents:
            return  # insert-ignore: a concurrent writer got there first
        now = _now()
        state.documents[document.key] = replace(
            document,
            pk=next(self.uow.factory._doc_pk),
            updated_at=document.updated_at or now,
        )

    def save(self, document: Document) -> None:
        state = self.uow.writable()
        stored = state.documents.get(document.key)
        if stored is None:
            raise KeyError(f"document {document.key} was never added")
        state.documents[document.key] = replace(document, pk=stored.pk)

    def save_many(self, documents: Sequence[Document]) -> None:
        for document in documents:
            self.save(document)

    def list(
        self, tenant_id: str, dataset_id: str, document_ids: Sequence[str] | None = None
    ) -> builtins.list[Document]:
        wanted = None if document_ids is None else set(document_ids)
        docs = [
            d.copy()
            for k, d in self.uow.state.documents.items()
            if _of(k, tenant_id, dataset_id) and (wanted is None or k.document_id in wanted)
        ]
        return sorted(docs, key=lambda d: (d.source, d.document_id))

    def find(self, tenant_id: str, document_id: str) -> builtins.list[Document]:
        return [
            d.copy()
            for k, d in sorted(self.uow.state.documents.items(), key=lambda kv: str(kv[0]))
            if k.tenant_id == tenant_id and k.document_id == document_id
        ]

    def status_counts(self, tenant_id: str, dataset_id: str) -> dict[str, int]:
        return dict(
            Counter(
                d.status.value
                for k, d in self.uow.state.documents.items()
                if _of(k, tenant_id, dataset_id)
            )
        )


# -- segments -----------------------------------------------------------------------


class _Segments(_Repo):
    def _of_document(self, key: DocKey) -> list[_SegmentRow]:
        rows = [r for r in self.uow.state.segments.values() if r.key == key]
        return sorted(rows, key=lambda r: (r.position, r.id))

    def _new_row(self, document: Document, seg: Segment, job_id: str | None) -> _SegmentRow:
        return _SegmentRow(
            id=next(self.uow.factory._segment_id),
            key=document.key,
            index_node_id=seg.index_node_id,
            doc_hash=seg.doc_hash,
            position=seg.position,
            content=seg.content,
            answer=seg.answer,
            parent=seg.parent,
            tokens=seg.tokens,
            word_count=seg.word_count,
            version=document.version,
            job_id=job_id,
        )

    def existing(self, key: DocKey) -> list[ExistingSegment]:
        return [
            ExistingSegment(r.index_node_id, r.doc_hash, r.position, r.indexed)
            for r in self._of_document(key)
            if r.job_id is None
        ]

    def existing_many(self, keys: Iterable[DocKey]) -> dict[DocKey, list[ExistingSegment]]:
        return {k: self.existing(k) for k in keys}

    def replace_split(
        self,
        document: Document,
        segments: Sequence[Segment],
        diff: SegmentDiff,
        keep_removed: bool,
    ) -> tuple[int, int, int]:
        state = self.uow.writable()
        key = document.key
        removed = set() if keep_removed else set(diff.removed)
        for r in self._of_document(key):
            if r.index_node_id in removed:
                del state.segments[r.index_node_id]
        existing = {r.index_node_id: r for r in self._of_document(key)}
        reindex = {s.index_node_id for s in diff.to_index}
        for seg in segments:
            old = existing.get(seg.index_node_id)
            if old is None:
                if seg.index_node_id not in state.segments:  # insert-ignore
                    state.segments[seg.index_node_id] = self._new_row(document, seg, None)
            elif seg.index_node_id in reindex:
                old.position, old.version, old.status = seg.position, document.version, "indexing"
                old.vector_indexed = old.keywords_indexed = False
            else:
                old.position = seg.position
        # imported segments (and any kept on purpose) follow the split ones
        in_split = {s.index_node_id for s in segments}
        leftovers = sorted(
            (r for i, r in existing.items() if i not in in_split),
            key=lambda r: (r.job_id is not None, r.position),
        )
        for offset, r in enumerate(leftovers):
            r.position = len(segments) + offset
        return self._totals(key)

    def _totals(self, key: DocKey) -> tuple[int, int, int]:
        rows = self._of_document(key)
        return len(rows), sum(r.tokens for r in rows), sum(r.word_count for r in rows)

    def append_imported(
        self, document: Document, job_id: str, segments: Sequence[Segment]
    ) -> list[Segment]:
        state = self.uow.writable()
        fresh = []
        for seg in segments:
            if seg.index_node_id in state.segments:
                continue  # a replayed import
            state.segments[seg.index_node_id] = self._new_row(document, seg, job_id)
            fresh.append(seg)
        return fresh

    def delete_document(self, key: DocKey) -> list[str]:
        state = self.uow.writable()
        ids = [r.index_node_id for r in self._of_document(key)]
        for i in ids:
            del state.segments[i]
        return ids

    def delete_one(
        self, key: DocKey, index_node_id: str | None, segment_id: int | None
    ) -> StoredSegment | None:
        state = self.uow.writable()
        for r in self._of_document(key):
            hit = r.index_node_id == index_node_id if index_node_id else r.id == segment_id
            if hit:
                del state.segments[r.index_node_id]
                return r.stored(self._source(key))
        return None

    def mark(self, column: str, index_node_ids: Sequence[str], value: bool = True) -> int:
        if column not in FLAGS:
            raise ValueError(f"unknown flag column {column!r}; one of {FLAGS}")
        state = self.uow.writable()
        n = 0
        for i in set(index_node_ids):
            row = state.segments.get(i)
            if row is not None:
                setattr(row, column, value)
                n += 1
        return n

    def alive(self, index_node_ids: Sequence[str]) -> set[str]:
        segments = self.uow.state.segments
        return {i for i in index_node_ids if i in segments}

    def _searchable(self, r: _SegmentRow) -> bool:
        doc = self.uow.state.documents.get(r.key)
        return r.enabled and doc is not None and doc.enabled and not doc.archived

    def by_ids(self, index_node_ids: Sequence[str]) -> dict[str, StoredSegment]:
        segments = self.uow.state.segments
        return {
            i: segments[i].stored(
                self._source(segments[i].key), searchable=self._searchable(segments[i])
            )
            for i in index_node_ids
            if i in segments
        }

    def owners(self, index_node_ids: Sequence[str]) -> dict[str, DocKey]:
        segments = self.uow.state.segments
        return {i: segments[i].key for i in index_node_ids if i in segments}

    def in_dataset(
        self, tenant_id: str, dataset_id: str, index_node_ids: Sequence[str]
    ) -> dict[str, StoredSegment]:
        return {
            i: r
            for i, r in self.by_ids(index_node_ids).items()
            if _of(self.uow.state.segments[i].key, tenant_id, dataset_id) and r.searchable
        }

    def _source(self, key: DocKey) -> str:
        doc = self.uow.state.documents.get(key)
        return doc.source if doc else ""

    def ids_for_document(self, key: DocKey) -> set[str]:
        return {r.index_node_id for r in self._of_document(key) if self._searchable(r)}

    def searchable(self, index_node_ids: Sequence[str]) -> set[str]:
        segments = self.uow.state.segments
        return {i for i in index_node_ids if i in segments and self._searchable(segments[i])}

    def pending_count(self, key: DocKey) -> int:
        return sum(1 for r in self._of_document(key) if not r.indexed and self._searchable(r))

    def find(
        self, key: DocKey, index_node_id: str | None, segment_id: int | None
    ) -> StoredSegment | None:
        for r in self._of_document(key):
            if (r.index_node_id == index_node_id) if index_node_id else (r.id == segment_id):
                return r.stored(self._source(key), searchable=self._searchable(r))
        return None

    def switch(self, index_node_id: str, enabled: bool) -> None:
        row = self.uow.writable().segments.get(index_node_id)
        if row is not None:
            row.enabled = enabled
            if enabled:
                row.vector_indexed = row.keywords_indexed = False

    def rewrite(self, index_node_id: str, segment: Segment, version: int) -> None:
        state = self.uow.writable()
        row = state.segments.pop(index_node_id, None)
        if row is None:
            return
        row.index_node_id, row.doc_hash = segment.index_node_id, segment.doc_hash
        row.content, row.answer = segment.content, segment.answer
        row.tokens, row.word_count = segment.tokens, segment.word_count
        row.version, row.status = version, "indexing"
        row.vector_indexed = row.keywords_indexed = False
        state.segments[segment.index_node_id] = row

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        return {k: self.ids_for_document(k) for k in keys}

    def pending_counts(self, keys: Iterable[DocKey]) -> dict[DocKey, int]:
        return {k: self.pending_count(k) for k in keys}

    def hashes(self, key: DocKey, exclude_job: str | None = None) -> tuple[int, list[str]]:
        rows = self._of_document(key)
        start = max((r.position for r in rows), default=-1) + 1
        return start, [r.doc_hash for r in rows if exclude_job is None or r.job_id != exclude_job]

    def for_dataset(self, tenant_id: str, dataset_id: str) -> dict[str, StoredSegment]:
        return {
            i: r.stored(self._source(r.key), content=False, searchable=self._searchable(r))
            for i, r in self.uow.state.segments.items()
            if _of(r.key, tenant_id, dataset_id)
        }

    def count(self, tenant_id: str, dataset_id: str) -> int:
        return sum(1 for r in self.uow.state.segments.values() if _of(r.key, tenant_id, dataset_id))


# -- the embedding cache, payloads, jobs -------------------------------------


class _Embeddings(_Repo):
    def get_many(
        self, tenant_id: str, provider: str, model: str, doc_hashes: Iterable[str]
    ) -> dict[str, Any]:
        table = self.uow.state.embeddings
        out: dict[str, Any] = {}
        for h in set(doc_hashes):
            blob = table.get((tenant_id, provider, model, h))
            if blob is not None:
                out[h] = np.frombuffer(blob, dtype="<f4")
        return out

    def put_many(
        self, tenant_id: str, provider: str, model: str, vectors: Mapping[str, Sequence[float]]
    ) -> None:
        table = self.uow.writable().embeddings
        for h, v in vectors.items():
            table.setdefault((tenant_id, provider, model, h), np.asarray(v, dtype="<f4").tobytes())

    def prune(
        self,
        tenant_id: str,
        dataset_id: str | None = None,
        document_ids: Sequence[str] | None = None,
    ) -> int:
        state = self.uow.writable()

        def in_scope(r: _SegmentRow) -> bool:
            return (
                dataset_id is not None
                and r.key.dataset_id == dataset_id
                and (document_ids is None or r.key.document_id in document_ids)
            )

        mine = [r for r in state.segments.values() if r.key.tenant_id == tenant_id]
        used = {r.doc_hash for r in mine if not in_scope(r)}
        scoped = {r.doc_hash for r in mine if in_scope(r)}
        gone = [
            k
            for k in state.embeddings
            if k[0] == tenant_id and k[3] not in used and (dataset_id is None or k[3] in scoped)
        ]
        for k in gone:
            del state.embeddings[k]
        return len(gone)

    def count(
        self, provider: str | None = None, model: str | None = None, tenant_id: str | None = None
    ) -> int:
        return sum(
            1
            for t, p, m, _ in self.uow.state.embeddings
            if (provider is None or p == provider)
            and (model is None or m == model)
            and (tenant_id is None or t == tenant_id)
        )


class _Payloads(_Repo):
    def put(self, key: str, data: bytes, replace_prefix: str | None = None) -> None:
        table = self.uow.writable().payloads
        if replace_prefix:
            for k in [k for k in table if k.startswith(replace_prefix) and k != key]:
                del table[k]
        table[key] = bytes(data)

    def get(self, key: str) -> bytes | None:
        return self.uow.state.payloads.get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        table = self.uow.state.payloads
        return {k: table[k] for k in keys if k in table}

    def delete_many(self, keys: Sequence[str]) -> None:
        table = self.uow.writable().payloads
        for k in keys:
            table.pop(k, None)

    def delete_prefix(self, prefix: str) -> None:
        table = self.uow.writable().payloads
        for k in [k for k in table if k.startswith(prefix)]:
            del table[k]


class _Jobs(_Repo):
    def create(self, key: DocKey, job_id: str, total: int) -> None:
        self.uow.writable().jobs.setdefault(
            (key, job_id),
            {
                "job_id": job_id,
                "tenant_id": key.tenant_id,
                "dataset_id": key.dataset_id,
                "document_id": key.document_id,
                "status": "waiting",
                "total": total,
                "completed": 0,
                "error": None,
                "updated_at": _now(),
            },
        )

    def _update(self, job: dict[str, Any] | None, **values: Any) -> None:
        if job is not None:
            job.update(values, updated_at=_now())

    def processing(self, key: DocKey, job_id: str, fresh: int) -> None:
        job = self.uow.writable().jobs.get((key, job_id))
        if fresh:
            self._update(job, status="processing", completed=0)
        elif job is not None:
            self._update(job, status="completed", completed=job["total"])

    def fail(self, key: DocKey, job_id: str, reason: str) -> None:
        job = self.uow.writable().jobs.get((key, job_id))
        self._update(job, status="error", error=reason[:MAX_ERROR_CHARS])

    def _of_document(self, key: DocKey, statuses: set[str]) -> list[dict[str, Any]]:
        return [
            j
            for (k, _), j in self.uow.writable().jobs.items()
            if k == key and j["status"] in statuses
        ]

    def complete_for_document(self, key: DocKey) -> None:
        for job in self._of_document(key, {"processing"}):
            self._update(job, status="completed", completed=job["total"])

    def complete_for_documents(self, keys: Sequence[DocKey]) -> None:
        for key in keys:
            self.complete_for_document(key)

    def fail_for_document(self, key: DocKey, reason: str) -> None:
        for job in self._of_document(key, {"waiting", "processing"}):
            self._update(job, status="error", error=reason[:MAX_ERROR_CHARS])

    def get(self, key: DocKey, job_id: str) -> dict[str, Any] | None:
        job = self.uow.state.jobs.get((key, job_id))
        return dict(job) if job else None

    def find(
        self, tenant_id: str, job_id: str, dataset_id: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        found = [
            dict(j)
            for (k, name), j in self.uow.state.jobs.items()
            if name == job_id and _of(k, tenant_id, dataset_id or k.dataset_id)
        ]
        return sorted(found, key=lambda j: (j["dataset_id"], j["document_id"]))

    def delete(
        self, tenant_id: str, dataset_id: str, document_ids: Sequence[str] | None = None
    ) -> int:
        jobs = self.uow.writable().jobs
        gone = [
            (k, name)
            for k, name in jobs
            if _of(k, tenant_id, dataset_id)
            and (document_ids is None or k.document_id in document_ids)
        ]
        for g in gone:
            del jobs[g]
        return len(gone)


def _index_key(r: VectorIndexRecord) -> tuple[str, str, str, str]:
    return (r.tenant_id, r.dataset_id, r.target.provider, r.target.model)


class _VectorIndexes(_Repo):
    def for_dataset(self, tenant_id: str, dataset_id: str) -> list[VectorIndexRecord]:
        return self.for_datasets([(tenant_id, dataset_id)]).get((tenant_id, dataset_id), [])

    def for_datasets(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], list[VectorIndexRecord]]:
        wanted = set(keys)
        out: dict[tuple[str, str], list[VectorIndexRecord]] = {}
        for r in self.uow.state.vector_indexes.values():
            if (r.tenant_id, r.dataset_id) in wanted:
                out.setdefault((r.tenant_id, r.dataset_id), []).append(r)
        return out

    def add(self, record: VectorIndexRecord) -> bool:
        table = self.uow.writable().vector_indexes
        serving = record.state is IndexState.SERVING and any(
            (r.tenant_id, r.dataset_id) == (record.tenant_id, record.dataset_id)
            and r.state is IndexState.SERVING
            for r in table.values()
        )
        if _index_key(record) in table or serving:
            return False
        table[_index_key(record)] = record
        return True

    def save(self, record: VectorIndexRecord) -> None:
        table = self.uow.writable().vector_indexes
        old = table.get(_index_key(record))
        created = old.created_at if old is not None else record.created_at
        table[_index_key(record)] = replace(record, created_at=created or _now())

    def remove(self, record: VectorIndexRecord) -> None:
        self.uow.writable().vector_indexes.pop(_index_key(record), None)
