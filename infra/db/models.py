"""SQLAlchemy 2 models: the durable state shared by every stage.

Schema changes go through Alembic (infra/db/migrations); these models are the
source the migrations are generated from."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


def _ts() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


class DatasetRow(Base):
    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("tenant_id", "dataset_id", name="uq_datasets_tenant_dataset"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    dataset_id: Mapped[str] = mapped_column(String(128))
    embedding_provider: Mapped[str | None] = mapped_column(String(64))
    embedding_model: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = _ts()


class DocumentRow(Base):
    __tablename__ = "documents"
    __table_args__ = (
        UniqueConstraint("tenant_id", "dataset_id", "document_id", name="uq_documents_key"),
        Index("ix_documents_dataset_status", "tenant_id", "dataset_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    dataset_id: Mapped[str] = mapped_column(String(128))
    document_id: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(1024))
    doc_form: Mapped[str] = mapped_column(String(32), default="text")
    version: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="waiting")
    error: Mapped[str | None] = mapped_column(Text)
    content_hash: Mapped[str | None] = mapped_column(String(128))
    mime_type: Mapped[str | None] = mapped_column(String(128))
    # what the current version was read from (the event's uri), or inline
    # content; both NULL for rows claimed before migration 0007
    uri: Mapped[str | None] = mapped_column(String(4096))
    inline_content: Mapped[bool | None] = mapped_column(Boolean)
    chars: Mapped[int] = mapped_column(BigInteger, default=0)
    segment_count: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    word_count: Mapped[int] = mapped_column(BigInteger, default=0)
    # Work done for the current version, for summaries and benchmarks.
    embedded_texts: Mapped[int] = mapped_column(Integer, default=0)
    cache_hits: Mapped[int] = mapped_column(Integer, default=0)
    segments_added: Mapped[int] = mapped_column(Integer, default=0)
    segments_kept: Mapped[int] = mapped_column(Integer, default=0)
    segments_removed: Mapped[int] = mapped_column(Integer, default=0)
    # the version whose split set the three counters above: a redelivered split
    # of the same version must not overwrite them with a diff against itself
    split_version: Mapped[int | None] = mapped_column(BigInteger)
    # the event_id that claimed the current version (copies of it are not newer)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    # why the last event for this document was dropped (stale version, ...)
    last_dropped: Mapped[str | None] = mapped_column(Text)
    # Dify's switches (migration 0010): out of both indexes when not enabled
    # or archived; an archived document refuses updates and segment operations
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    archived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    parsing_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    splitting_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    indexing_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SegmentRow(Base):
    __tablename__ = "segments"
    __table_args__ = (
        Index("ix_segments_document", "document_pk", "position"),
        Index("ix_segments_dataset", "tenant_id", "dataset_id", "document_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    document_pk: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(128))
    dataset_id: Mapped[str] = mapped_column(String(128))
    document_id: Mapped[str] = mapped_column(String(128))
    index_node_id: Mapped[str] = mapped_column(String(64), unique=True)
    doc_hash: Mapped[str] = mapped_column(String(64), index=True)
    position: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text)
    parent: Mapped[str | None] = mapped_column(Text)
    word_count: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="waiting")
    vector_indexed: Mapped[bool] = mapped_column(Boolean, default=False)
    keywords_indexed: Mapped[bool] = mapped_column(Boolean, default=False)
    # a disabled segment is out of both indexes (migration 0010)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    version: Mapped[int] = mapped_column(BigInteger)
    # set for segments added by a batch import: they are not in the source
    # file, so an update of the document keeps them
    job_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class EmbeddingRow(Base):
    """(tenant, provider, model, doc_hash) -> vector as little-endian float32
    bytes. Keyed by tenant: a hit must never tell one tenant that another holds
    the same text."""

    __tablename__ = "embeddings"
    __table_args__ = (
        # doc_hash before the model: pruning finds a tenant's entries of a text
        # (every model) by the key's prefix; lookups give all four columns
        PrimaryKeyConstraint("tenant_id", "doc_hash", "provider", "model", name="pk_embeddings"),
    )

    tenant_id: Mapped[str] = mapped_column(String(128))
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    doc_hash: Mapped[str] = mapped_column(String(64))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = _ts()


class PayloadRow(Base):
    """Claim-check store: payloads too large to travel inline on Kafka."""

    __tablename__ = "payloads"

    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = _ts()


class BatchJobRow(Base):
    __tablename__ = "batch_jobs"
    __table_args__ = (
        # job ids are chosen by clients: two tenants, datasets or documents may
        # all say "import-1", and none may touch another's job. The key's first
        # three columns also serve the per-document lookups.
        PrimaryKeyConstraint(
            "tenant_id", "dataset_id", "document_id", "job_id", name="pk_batch_jobs"
        ),
    )

    tenant_id: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[str] = mapped_column(String(128))
    dataset_id: Mapped[str] = mapped_column(String(128))
    document_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="waiting")
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _ts()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class DeliveryRow(Base):
    """Per consumer group and partition: how many times delivery has begun at
    ``start_offset`` (infra/db/deliveries.py). A worker that keeps dying on a
    message shows up here as a growing ``attempts``."""

    __tablename__ = "deliveries"
    __table_args__ = (
        PrimaryKeyConstraint("group_id", "topic", "partition_id", name="pk_deliveries"),
    )

    group_id: Mapped[str] = mapped_column(String(255))
    topic: Mapped[str] = mapped_column(String(255))
    partition_id: Mapped[int] = mapped_column(Integer)
    start_offset: Mapped[int] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class VectorIndexRow(Base):
    """A dataset's vector index: one embedding model's collection, and whether
    it serves the dataset's searches, is being built, or is retired
    (domain/vector_indexes.py holds the rules)."""

    __tablename__ = "vector_indexes"
    __table_args__ = (
        UniqueConstraint(
            "tenant_id", "dataset_id", "provider", "model", name="uq_vector_indexes_model"
        ),
        # at most one serving index per dataset, even for two first loads at once
        Index(
            "uq_vector_indexes_serving",
            "tenant_id",
            "dataset_id",
            unique=True,
            sqlite_where=text("state = 'serving'"),
            postgresql_where=text("state = 'serving'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    dataset_id: Mapped[str] = mapped_column(String(128))
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    model_spec: Mapped[str] = mapped_column(String(1024))
    dim: Mapped[int] = mapped_column(Integer)
    collection: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    progress_done: Mapped[int] = mapped_column(BigInteger, default=0)
    progress_total: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = _ts()
    switched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    drop_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
