"""The ports: the small interfaces stages need from the outside world.

Stages (consumers/) depend on these, never on infra/. infra/ implements them
against PostgreSQL/SQLite, Milvus (vectors and BM25 full text), jieba and the
embedding model; the stage unit tests implement them in memory (tests/fakes.py).

Storage goes through a unit of work: one database transaction, opened with
``with uow_factory() as uow:``, committed by ``uow.commit()`` and rolled back
if the block ends without it. A read-only unit of work (``readonly=True``)
never takes the write lock (SQLite serializes writers), so a stage reads, does
its slow work (extraction, the model, Milvus) outside any transaction, and
then writes once.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

from domain.documents import DocKey, Document
from domain.segments import ExistingSegment, Segment, SegmentDiff, StoredSegment
from domain.vector_indexes import IndexTarget, VectorIndexRecord

# -- the embedding model -------------------------------------------------------


class TokenCounter(Protocol):
    """Counts tokens the way the embedding model will see them."""

    def count_tokens(self, text: str) -> int: ...


class ModelTokens(TokenCounter, Protocol):
    """A token counter that also knows the model's input limit."""

    max_input_tokens: int


class EmbeddingProvider(ModelTokens, Protocol):
    """A text embedding model. ``provider`` and ``model`` key the embedding
    cache, so two providers serving the same model never share vectors by
    accident."""

    provider: str
    model: str
    dim: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


# -- indexes beside the database -------------------------------------------------


@dataclass(frozen=True)
class VectorRow:
    index_node_id: str
    vector: Sequence[float] | Any  # a list or a numpy array
    key: DocKey


class VectorIndex(Protocol):
    """Vectors keyed by index_node_id; every write is an idempotent upsert."""

    def upsert(self, rows: Sequence[VectorRow]) -> int:
        """Returns how many rows were written."""
        ...

    def delete(self, index_node_ids: Sequence[str]) -> None: ...

    def delete_document(self, key: DocKey) -> None: ...

    def ids_for_document(self, key: DocKey) -> list[str]: ...

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        """The same for many documents, in as few round trips as possible;
        read with strong consistency (completion decisions depend on it)."""
        ...

    @property
    def target(self) -> IndexTarget:
        """The model and collection this index writes (what a registry row names)."""
        ...

    def ensure_alias(self, tenant_id: str, dataset_id: str) -> None:
        """Give the dataset a search alias pointing at this index's collection,
        unless it has one (then it is left alone)."""
        ...


@dataclass(frozen=True)
class KeywordRow:
    """One segment's searchable text (content, then the answer of a Q&A pair)."""

    index_node_id: str
    key: DocKey
    text: str


class KeywordIndex(Protocol):
    """Full-text (BM25) index of segment texts keyed by index_node_id, one
    entity per segment; every write is an idempotent upsert."""

    def upsert(self, rows: Sequence[KeywordRow]) -> int:
        """Returns how many rows were written."""
        ...

    def delete(self, index_node_ids: Sequence[str]) -> None: ...

    def delete_document(self, key: DocKey) -> None: ...

    def ids_for_document(self, key: DocKey) -> list[str]: ...

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        """The same for many documents; read with strong consistency."""
        ...

    def search(
        self, query: str, tenant_id: str, dataset_id: str, limit: int
    ) -> list[tuple[str, float]]:
        """(index_node_id, BM25 score >= 0), best first."""
        ...

    def count(self, tenant_id: str, dataset_id: str) -> int: ...


class DocumentReader(Protocol):
    """Turns a lifecycle event's body (inline content or a reference) into
    text; raises DocumentError with a reason a person can act on."""

    def read(
        self, content: str | None, uri: str | None, mime_type: str | None
    ) -> tuple[str, str | None]: ...

    def extract(self, data: bytes, filename: str, mime_type: str | None) -> tuple[str, str | None]:
        """Raw bytes (an uploaded file's) to (text, mime type), within the
        same limits as ``read``; ``filename``'s extension names the format
        when ``mime_type`` does not."""
        ...


# -- repositories (inside a unit of work) ----------------------------------------


class DocumentRepository(Protocol):
    def get(self, key: DocKey, for_update: bool = False) -> Document | None:
        """``for_update`` locks the row until the unit of work ends (PostgreSQL)."""
        ...

    def get_many(self, keys: Iterable[DocKey], for_update: bool = False) -> dict[DocKey, Document]:
        """Many documents in as few statements as possible (stages read and
        write per batch, not per document); ``for_update`` as get()."""
        ...

    def add_many(self, documents: Sequence[Document]) -> None:
        """Insert-if-absent for documents about to be created, nothing read
        back: get_many(..., for_update=True) after it. A row another writer
        inserted first stays as it is."""
        ...

    def add(self, document: Document) -> None:
        """Insert a new document (and its dataset, if new)."""
        ...

    def save(self, document: Document) -> None:
        """Write back every field of a loaded document."""
        ...

    def save_many(self, documents: Sequence[Document]) -> None:
        """save() for many loaded documents, in one statement."""
        ...

    def list(
        self, tenant_id: str, dataset_id: str, document_ids: Sequence[str] | None = None
    ) -> builtins.list[Document]: ...

    def find(self, tenant_id: str, document_id: str) -> builtins.list[Document]: ...

    def status_counts(self, tenant_id: str, dataset_id: str) -> dict[str, int]: ...


class SegmentRepository(Protocol):
    def existing(self, key: DocKey) -> list[ExistingSegment]:
        """The split segments of a document (imported ones left out)."""
        ...

    def existing_many(self, keys: Iterable[DocKey]) -> dict[DocKey, list[ExistingSegment]]:
        """existing() for many documents in one read; every key answered."""
        ...

    def replace_split(
        self,
        document: Document,
        segments: Sequence[Segment],
        diff: SegmentDiff,
        keep_removed: bool,
    ) -> tuple[int, int, int]:
        """Insert new, re-position kept, reset the flags of re-indexed, delete
        removed (unless ``keep_removed``); imported segments stay after the
        split ones. Returns (segments, tokens, words) of the document after."""
        ...

    def append_imported(
        self, document: Document, job_id: str, segments: Sequence[Segment]
    ) -> list[Segment]:
        """Insert imported segments not there yet; returns those inserted."""
        ...

    def delete_document(self, key: DocKey) -> list[str]:
        """Remove every segment of a document; returns their ids."""
        ...

    def delete_one(
        self, key: DocKey, index_node_id: str | None, segment_id: int | None
    ) -> StoredSegment | None: ...

    def mark(self, column: str, index_node_ids: Sequence[str], value: bool = True) -> int:
        """Set ``vector_indexed`` or ``keywords_indexed``."""
        ...

    def alive(self, index_node_ids: Sequence[str]) -> set[str]:
        """Which of these segments still exist."""
        ...

    def by_ids(self, index_node_ids: Sequence[str]) -> dict[str, StoredSegment]: ...

    def owners(self, index_node_ids: Sequence[str]) -> dict[str, DocKey]:
        """The document of each of these segments that still exists (one
        round trip per chunk of ids): stages check an event's ids are its own."""
        ...

    def in_dataset(
        self, tenant_id: str, dataset_id: str, index_node_ids: Sequence[str]
    ) -> dict[str, StoredSegment]:
        """``by_ids`` limited to one tenant's dataset and to searchable
        segments: what search resolves hits with, so an id that is not the
        dataset's, or is disabled or archived, never returns text."""
        ...

    def ids_for_document(self, key: DocKey) -> set[str]:
        """The document's segments that belong in the indexes: enabled
        segments of an enabled, unarchived document (searchable)."""
        ...

    def searchable(self, index_node_ids: Sequence[str]) -> set[str]:
        """Which of these segments exist and belong in the indexes: what the
        index stages upsert; every other id they are sent is deleted."""
        ...

    def pending_count(self, key: DocKey) -> int:
        """Searchable segments of a document not yet flagged by both branches."""
        ...

    def find(
        self, key: DocKey, index_node_id: str | None, segment_id: int | None
    ) -> StoredSegment | None:
        """One segment of the document, by index_node_id or segment_id."""
        ...

    def switch(self, index_node_id: str, enabled: bool) -> None:
        """Enable or disable one segment; enabling clears both branches' flags."""
        ...

    def rewrite(self, index_node_id: str, segment: Segment, version: int) -> None:
        """New text for one segment (its row, position and switch stay): new
        doc_hash and index_node_id, both flags cleared."""
        ...

    def ids_for_documents(self, keys: Iterable[DocKey]) -> dict[DocKey, set[str]]:
        """ids_for_document for many documents in one read; every key answered."""
        ...

    def pending_counts(self, keys: Iterable[DocKey]) -> dict[DocKey, int]:
        """pending_count for many documents in one read; every key answered."""
        ...

    def hashes(self, key: DocKey, exclude_job: str | None = None) -> tuple[int, list[str]]:
        """(next free position, doc_hash of every segment), leaving out one
        import job's own segments (so its replay is a no-op)."""
        ...

    def for_dataset(self, tenant_id: str, dataset_id: str) -> dict[str, StoredSegment]:
        """Every segment of a dataset without its text (content is '')."""
        ...

    def count(self, tenant_id: str, dataset_id: str) -> int: ...


class EmbeddingCache(Protocol):
    """(tenant, provider, model, doc_hash) -> vector, stored as float32 bytes.
    Keyed by tenant: one tenant's hits never reveal another tenant's texts."""

    def get_many(
        self, tenant_id: str, provider: str, model: str, doc_hashes: Iterable[str]
    ) -> dict[str, Any]: ...

    def put_many(
        self, tenant_id: str, provider: str, model: str, vectors: Mapping[str, Sequence[float]]
    ) -> None:
        """Insert, skipping keys already there (concurrent writers never fail)."""
        ...

    def prune(
        self,
        tenant_id: str,
        dataset_id: str | None = None,
        document_ids: Sequence[str] | None = None,
    ) -> int:
        """Remove the tenant's entries (every model) that no segment of the
        tenant uses outside the scope (a dataset, or some of its documents),
        the scope's segments counted as gone: call it before deleting them.
        Without a scope, every entry no segment of the tenant uses. Returns
        how many went."""
        ...

    def count(
        self, provider: str | None = None, model: str | None = None, tenant_id: str | None = None
    ) -> int: ...


class VectorIndexRegistry(Protocol):
    """The vector indexes of each dataset (domain/vector_indexes.py), keyed by
    (tenant, dataset, provider, model)."""

    def for_dataset(self, tenant_id: str, dataset_id: str) -> list[VectorIndexRecord]: ...

    def for_datasets(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], list[VectorIndexRecord]]:
        """The same for many datasets in one round trip (a stage's batch)."""
        ...

    def add(self, record: VectorIndexRecord) -> bool:
        """Insert unless the dataset has a record of that model, or the record
        serves and another one already does; returns whether it was inserted."""
        ...

    def save(self, record: VectorIndexRecord) -> None:
        """Insert or update the record of (tenant, dataset, provider, model)."""
        ...

    def remove(self, record: VectorIndexRecord) -> None: ...


class PayloadStore(Protocol):
    """Claim-check store for payloads too large to travel on the broker."""

    def put(self, key: str, data: bytes, replace_prefix: str | None = None) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The payloads under ``keys`` that exist, in one read."""
        ...

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete exactly these keys (not prefixes), in one statement."""
        ...

    def delete_prefix(self, prefix: str) -> None: ...


class ImportJobs(Protocol):
    """Batch-import jobs, keyed by (tenant, dataset, document, job_id): a job
    id reused elsewhere never touches the first job."""

    def create(self, key: DocKey, job_id: str, total: int) -> None: ...

    def processing(self, key: DocKey, job_id: str, fresh: int) -> None:
        """Segments were appended (``fresh`` new ones; 0 completes the job)."""
        ...

    def fail(self, key: DocKey, job_id: str, reason: str) -> None: ...

    def complete_for_document(self, key: DocKey) -> None:
        """The document completed: so did its jobs still processing."""
        ...

    def complete_for_documents(self, keys: Sequence[DocKey]) -> None:
        """complete_for_document for many documents in one statement."""
        ...

    def fail_for_document(self, key: DocKey, reason: str) -> None:
        """The document was deleted: its unfinished jobs fail."""
        ...

    def get(self, key: DocKey, job_id: str) -> dict[str, Any] | None: ...

    def find(
        self, tenant_id: str, job_id: str, dataset_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The tenant's jobs called ``job_id`` (in one dataset, if given)."""
        ...

    def delete(
        self, tenant_id: str, dataset_id: str, document_ids: Sequence[str] | None = None
    ) -> int:
        """Remove the job records of some documents of a dataset (all of them
        without ``document_ids``); returns how many went."""
        ...


class UnitOfWork(Protocol):
    # read-only properties: an adapter's own repository classes qualify
    @property
    def documents(self) -> DocumentRepository: ...
    @property
    def segments(self) -> SegmentRepository: ...
    @property
    def embeddings(self) -> EmbeddingCache: ...
    @property
    def payloads(self) -> PayloadStore: ...
    @property
    def jobs(self) -> ImportJobs: ...
    @property
    def vector_indexes(self) -> VectorIndexRegistry: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def commit(self) -> None: ...


class UnitOfWorkFactory(Protocol):
    def __call__(self, readonly: bool = False) -> UnitOfWork: ...


Clock = Callable[[], float]
