"""In-memory implementations of the ports (domain/ports.py), for fast unit
tests of the stages. The repository contract suite runs against them too, so
they follow the ports' documented semantics, the SQL adapters' included:

- a unit of work works on its own copy of the state; ``commit`` publishes
  what it changed (row by row), leaving the block without it discards it;
- a read-only unit of work refuses every write;
- inserts of a key that exists are ignored (documents, embeddings, jobs).
"""

from __future__ import annotations

import builtins
import copy
import hashlib
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Self

import numpy as np

from domain.documents import DocKey, Document
from domain.errors import DocumentError
from domain.model import ExistingSegment, Segment, SegmentDiff, StoredSegment
from domain.ports import (
    DocumentRepository,
    EmbeddingCache,
    ImportJobs,
    KeywordPostings,
    PayloadStore,
    SegmentRepository,
    VectorRow,
)

MAX_ERROR_CHARS = 4000
FLAGS = ("vector_indexed", "keywords_indexed")


# -- the embedding model ----------------------------------------------------------


class HashingEmbeddingDouble:
    """Test double for the embedding model: deterministic unit vectors from a
    hash of the text, and whitespace token counting. Records every text it is
    asked to embed, so tests can assert what reached 'the model'."""

    provider = "test-double"
    model = "hashing-embedding-double"
    dim = 16
    max_input_tokens = 64

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype("float32")
            out.append((v / np.linalg.norm(v)).tolist())
        return out

    @property
    def embedded_texts(self) -> list[str]:
        return [t for call in self.calls for t in call]


# -- the indexes beside the database -------------------------------------------------


class InMemoryVectorIndex:
    """VectorIndex in a dict: index_node_id -> (vector, document)."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[list[float], DocKey]] = {}

    def upsert(self, rows: Sequence[VectorRow]) -> int:
        for r in rows:
            self.rows[r.index_node_id] = ([float(x) for x in r.vector], r.key)
        return len(rows)

    def delete(self, index_node_ids: Sequence[str]) -> None:
        for i in index_node_ids:
            self.rows.pop(i, None)

    def delete_document(self, key: DocKey) -> None:
        for i in self.ids_for_document(key):
            del self.rows[i]

    def ids_for_document(self, key: DocKey) -> list[str]:
        return sorted(i for i, (_, k) in self.rows.items() if k == key)

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        wanted = set(keys)
        out: dict[DocKey, set[str]] = {k: set() for k in wanted}
        for i, (_, k) in self.rows.items():
            if k in wanted:
                out[k].add(i)
        return out


class InMemoryDocumentReader:
    """Test double for the document reader: inline content passes through
    (empty content is refused, as the real reader does); a uri is looked up
    in ``files``, where a DocumentError stands for a broken file; uploaded
    bytes are decoded as UTF-8. Calls ``on_read`` first, so a test can
    observe the world during extraction."""

    def __init__(self, files: Mapping[str, str | DocumentError] | None = None) -> None:
        self.files: dict[str, str | DocumentError] = dict(files or {})
        self.reads: list[str] = []
        self.on_read: Callable[[], None] | None = None

    def read(
        self, content: str | None, uri: str | None, mime_type: str | None
    ) -> tuple[str, str | None]:
        if self.on_read is not None:
            self.on_read()
        if content is not None:
            self.reads.append("<inline>")
            if not content.strip():
                raise DocumentError("the document is empty")
            return content, mime_type or "text/plain"
        assert uri is not None
        self.reads.append(uri)
        found = self.files.get(uri)
        if found is None:
            raise DocumentError(f"file {uri} does not exist")
        if isinstance(found, DocumentError):
            raise found
        return found, mime_type or "text/plain"

    def extract(self, data: bytes, filename: str, mime_type: str | None) -> tuple[str, str | None]:
        """Uploaded bytes are UTF-8 text here; recorded as ``bytes:<filename>``."""
        if self.on_read is not None:
            self.on_read()
        self.reads.append(f"bytes:{filename}")
        text = data.decode()
        if not text.strip():
            raise DocumentError("the document is empty")
        return text, mime_type or "text/plain"


class InMemoryKeywords:
    """Test double for the keyword extractor: the five most frequent words of
    a text (lower-cased), weighted by their share; deterministic. Records the
    texts it was given."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def extract(self, text: str) -> list[tuple[str, float]]:
        self.texts.append(text)
        words = Counter(re.findall(r"\w+", text.lower()))
        total = sum(words.values()) or 1
        top = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        return [(w, n / total) for w, n in top]


# -- the state a unit of work sees ---------------------------------------------------


@dataclass
class _SegmentRow:
    id: int
    key: DocKey
    index_node_id: str
    doc_hash: str
    position: int
    content: str
    answer: str | None
    parent: str | None
    tokens: int
    word_count: int
    version: int
    job_id: str | None = None
    status: str = "indexing"
    vector_indexed: bool = False
    keywords_indexed: bool = False

    @property
    def indexed(self) -> bool:
        return self.vector_indexed and self.keywords_indexed

    def stored(self, source: str = "", content: bool = True) -> StoredSegment:
        return StoredSegment(
            index_node_id=self.index_node_id,
            document_id=self.key.document_id,
            doc_hash=self.doc_hash,
            position=self.position,
            content=self.content if content else "",
            answer=self.answer if content else None,
            parent=self.parent if content else None,
            tokens=self.tokens,
            word_count=self.word_count,
            vector_indexed=self.vector_indexed,
            keywords_indexed=self.keywords_indexed,
            job_id=self.job_id,
            source=source,
        )


@dataclass
class _State:
    """Every table, keyed like its unique key."""

    datasets: dict[tuple[str, str], bool] = field(default_factory=dict)
    documents: dict[DocKey, Document] = field(default_factory=dict)
    segments: dict[str, _SegmentRow] = field(default_factory=dict)
    embeddings: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    # (tenant, dataset, keyword, index_node_id) -> (document_id, weight)
    postings: dict[tuple[str, str, str, str], tuple[str, float]] = field(default_factory=dict)
    payloads: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    TABLES = ("datasets", "documents", "segments", "embeddings", "postings", "payloads", "jobs")


def _now() -> datetime:
    return datetime.now(UTC)


class InMemoryUnitOfWorkFactory:
    """``factory(readonly=False)`` -> an in-memory UnitOfWork over shared state."""

    def __init__(self) -> None:
        self.state = _State()
        # sequences, like a database's, are not transactional
        self._doc_pk = itertools.count(1)
        self._segment_id = itertools.count(1)
        self.commits = 0  # committed write units of work, for tests
        self.open_units = 0  # units of work inside their `with` block
        self.readonly_opened = 0  # read-only units of work entered so far

    def __call__(self, readonly: bool = False) -> InMemoryUnitOfWork:
        return InMemoryUnitOfWork(self, readonly)

    def _publish(self, base: _State, work: _State) -> None:
        for name in _State.TABLES:
            before: dict[Any, Any] = getattr(base, name)
            after: dict[Any, Any] = getattr(work, name)
            shared: dict[Any, Any] = getattr(self.state, name)
            for k, v in after.items():
                if k not in before or before[k] != v:
                    shared[k] = copy.deepcopy(v)
            for k in before.keys() - after.keys():
                shared.pop(k, None)
        self.commits += 1


class InMemoryUnitOfWork:
    def __init__(self, factory: InMemoryUnitOfWorkFactory, readonly: bool) -> None:
        self.factory = factory
        self.readonly = readonly
        self._base: _State | None = None
        self._work: _State | None = None
        # typed as the ports, which is what UnitOfWork's attributes promise
        self.documents: DocumentRepository = _Documents(self)
        self.segments: SegmentRepository = _Segments(self)
        self.embeddings: EmbeddingCache = _Embeddings(self)
        self.postings: KeywordPostings = _Postings(self)
        self.payloads: PayloadStore = _Payloads(self)
        self.jobs: ImportJobs = _Jobs(self)

    def __enter__(self) -> Self:
        self._base = copy.deepcopy(self.factory.state)
        self._work = copy.deepcopy(self._base)
        self.factory.open_units += 1
        self.factory.readonly_opened += self.readonly
        return self

    def __exit__(self, *exc: object) -> None:
        self._base = self._work = None
        self.factory.open_units -= 1

    def commit(self) -> None:
        if self.readonly:
            raise RuntimeError("commit of a read-only unit of work")
        assert self._base is not None and self._work is not None
        self.factory._publish(self._base, self._work)
        # what follows in the same block builds on what was just committed
        self._base = copy.deepcopy(self._work)

    @property
    def state(self) -> _State:
        if self._work is None:
            raise RuntimeError("the unit of work is used outside its `with` block")
        return self._work

    def writable(self) -> _State:
        if self.readonly:
            raise RuntimeError("write in a read-only unit of work")
        return self.state


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

    def get_many(self, keys: Iterable[DocKey]) -> dict[DocKey, Document]:
        docs = self.uow.state.documents
        return {k: docs[k].copy() for k in set(keys) if k in docs}

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

    def by_ids(self, index_node_ids: Sequence[str]) -> dict[str, StoredSegment]:
        segments = self.uow.state.segments
        return {
            i: segments[i].stored(self._source(segments[i].key))
            for i in index_node_ids
            if i in segments
        }

    def _source(self, key: DocKey) -> str:
        doc = self.uow.state.documents.get(key)
        return doc.source if doc else ""

    def ids_for_document(self, key: DocKey) -> set[str]:
        return {r.index_node_id for r in self._of_document(key)}

    def pending_count(self, key: DocKey) -> int:
        return sum(1 for r in self._of_document(key) if not r.indexed)

    def hashes(self, key: DocKey, exclude_job: str | None = None) -> tuple[int, list[str]]:
        rows = self._of_document(key)
        start = max((r.position for r in rows), default=-1) + 1
        return start, [r.doc_hash for r in rows if exclude_job is None or r.job_id != exclude_job]

    def for_dataset(self, tenant_id: str, dataset_id: str) -> dict[str, StoredSegment]:
        return {
            i: r.stored(self._source(r.key), content=False)
            for i, r in self.uow.state.segments.items()
            if _of(r.key, tenant_id, dataset_id)
        }

    def count(self, tenant_id: str, dataset_id: str) -> int:
        return sum(1 for r in self.uow.state.segments.values() if _of(r.key, tenant_id, dataset_id))


# -- the embedding cache, postings, payloads, jobs -------------------------------------


class _Embeddings(_Repo):
    def get_many(self, provider: str, model: str, doc_hashes: Iterable[str]) -> dict[str, Any]:
        table = self.uow.state.embeddings
        out: dict[str, Any] = {}
        for h in set(doc_hashes):
            blob = table.get((provider, model, h))
            if blob is not None:
                out[h] = np.frombuffer(blob, dtype="<f4")
        return out

    def put_many(self, provider: str, model: str, vectors: Mapping[str, Sequence[float]]) -> None:
        table = self.uow.writable().embeddings
        for h, v in vectors.items():
            table.setdefault((provider, model, h), np.asarray(v, dtype="<f4").tobytes())

    def count(self, provider: str | None = None, model: str | None = None) -> int:
        return sum(
            1
            for p, m, _ in self.uow.state.embeddings
            if (provider is None or p == provider) and (model is None or m == model)
        )


class _Postings(_Repo):
    def replace(
        self, key_postings: Mapping[tuple[DocKey, str], Sequence[tuple[str, float]]]
    ) -> None:
        table = self.uow.writable().postings
        nodes = {node for _, node in key_postings}
        for k in [k for k in table if k[3] in nodes]:
            del table[k]
        for (key, node), keywords in key_postings.items():
            for kw, weight in keywords:
                table.setdefault(
                    (key.tenant_id, key.dataset_id, kw, node), (key.document_id, float(weight))
                )

    def delete_nodes(self, index_node_ids: Sequence[str]) -> int:
        table = self.uow.writable().postings
        nodes = set(index_node_ids)
        gone = [k for k in table if k[3] in nodes]
        for k in gone:
            del table[k]
        return len(gone)

    def delete_document_orphans(self, key: DocKey) -> int:
        state = self.uow.writable()
        alive = {i for i, r in state.segments.items() if r.key == key}
        gone = [
            k
            for k, (doc, _) in state.postings.items()
            if (k[0], k[1], doc) == (key.tenant_id, key.dataset_id, key.document_id)
            and k[3] not in alive
        ]
        for k in gone:
            del state.postings[k]
        return len(gone)

    def nodes_for_document(self, key: DocKey) -> set[str]:
        return {
            k[3]
            for k, (doc, _) in self.uow.state.postings.items()
            if (k[0], k[1], doc) == (key.tenant_id, key.dataset_id, key.document_id)
        }

    def nodes(self, tenant_id: str, dataset_id: str) -> dict[str, str]:
        return {
            k[3]: doc
            for k, (doc, _) in self.uow.state.postings.items()
            if (k[0], k[1]) == (tenant_id, dataset_id)
        }

    def search(
        self, tenant_id: str, dataset_id: str, keywords: Mapping[str, float], limit: int
    ) -> list[tuple[str, float]]:
        scores: dict[str, float] = {}
        for (t, d, kw, node), (_, weight) in self.uow.state.postings.items():
            if (t, d) == (tenant_id, dataset_id) and kw in keywords:
                scores[node] = scores.get(node, 0.0) + weight * keywords[kw]
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]

    def count(self, tenant_id: str, dataset_id: str) -> int:
        return sum(1 for k in self.uow.state.postings if (k[0], k[1]) == (tenant_id, dataset_id))


class _Payloads(_Repo):
    def put(self, key: str, data: bytes, replace_prefix: str | None = None) -> None:
        table = self.uow.writable().payloads
        if replace_prefix:
            for k in [k for k in table if k.startswith(replace_prefix) and k != key]:
                del table[k]
        table[key] = bytes(data)

    def get(self, key: str) -> bytes | None:
        return self.uow.state.payloads.get(key)

    def delete_prefix(self, prefix: str) -> None:
        table = self.uow.writable().payloads
        for k in [k for k in table if k.startswith(prefix)]:
            del table[k]


class _Jobs(_Repo):
    def create(self, key: DocKey, job_id: str, total: int) -> None:
        self.uow.writable().jobs.setdefault(
            (key.tenant_id, job_id),
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

    def processing(self, tenant_id: str, job_id: str, fresh: int) -> None:
        job = self.uow.writable().jobs.get((tenant_id, job_id))
        if fresh:
            self._update(job, status="processing", completed=0)
        elif job is not None:
            self._update(job, status="completed", completed=job["total"])

    def fail(self, tenant_id: str, job_id: str, reason: str) -> None:
        job = self.uow.writable().jobs.get((tenant_id, job_id))
        self._update(job, status="error", error=reason[:MAX_ERROR_CHARS])

    def _of_document(self, key: DocKey, statuses: set[str]) -> list[dict[str, Any]]:
        return [
            j
            for j in self.uow.writable().jobs.values()
            if (j["tenant_id"], j["dataset_id"], j["document_id"])
            == (key.tenant_id, key.dataset_id, key.document_id)
            and j["status"] in statuses
        ]

    def complete_for_document(self, key: DocKey) -> None:
        for job in self._of_document(key, {"processing"}):
            self._update(job, status="completed", completed=job["total"])

    def fail_for_document(self, key: DocKey, reason: str) -> None:
        for job in self._of_document(key, {"waiting", "processing"}):
            self._update(job, status="error", error=reason[:MAX_ERROR_CHARS])

    def get(self, tenant_id: str, job_id: str) -> dict[str, Any] | None:
        job = self.uow.state.jobs.get((tenant_id, job_id))
        return dict(job) if job else None
