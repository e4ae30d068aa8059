"""In-memory implementations of the ports (domain/ports.py), for fast unit
tests of the stages. The repository contract suite runs against them too, so
they follow the ports' documented semantics, the SQL adapters' included:

- a unit of work works on its own copy of the state; ``commit`` publishes
  what it changed (row by row), leaving the block without it discards it;
- a read-only unit of work refuses every write;
- inserts of a key that exists are ignored (documents, embeddings, jobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from domain.documents import DocKey, Document
from domain.segments import StoredSegment
from domain.vector_indexes import VectorIndexRecord

MAX_ERROR_CHARS = 4000
FLAGS = ("vector_indexed", "keywords_indexed")


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
    enabled: bool = True

    @property
    def indexed(self) -> bool:
        return self.vector_indexed and self.keywords_indexed

    def stored(
        self, source: str = "", content: bool = True, searchable: bool = True
    ) -> StoredSegment:
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
            enabled=self.enabled,
            searchable=searchable,
        )


@dataclass
class _State:
    """Every table, keyed like its unique key."""

    datasets: dict[tuple[str, str], bool] = field(default_factory=dict)
    documents: dict[DocKey, Document] = field(default_factory=dict)
    segments: dict[str, _SegmentRow] = field(default_factory=dict)
    # (tenant, provider, model, doc_hash) -> float32 bytes
    embeddings: dict[tuple[str, str, str, str], bytes] = field(default_factory=dict)
    payloads: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[tuple[DocKey, str], dict[str, Any]] = field(default_factory=dict)
    # (tenant, dataset, provider, model) -> record
    vector_indexes: dict[tuple[str, str, str, str], VectorIndexRecord] = field(default_factory=dict)

    TABLES = (
        "datasets",
        "documents",
        "segments",
        "embeddings",
        "payloads",
        "jobs",
        "vector_indexes",
    )


def _now() -> datetime:
    return datetime.now(UTC)
