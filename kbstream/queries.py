"""Read-only questions the CLI (or any other front end) asks: counts for a
dataset, one row per document, one batch-import job. Plain dicts, ready for
JSON or a table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from domain.documents import Document, IndexingStatus
from infra.db.datasets import dataset_names

if TYPE_CHECKING:
    from kbstream.bootstrap import Container


def known_datasets(c: Container) -> list[str]:
    """The tenant's datasets, registered or holding documents, sorted."""
    return dataset_names(c.database, c.settings.tenant)


def dataset_stats(c: Container, dataset: str) -> dict[str, Any]:
    """Documents, segments, vectors, keyword index entities of a dataset, and
    the embeddings its tenant has cached for the current model."""
    tenant = c.settings.tenant
    provider, model, _ = c.model_identity
    with c.uow(readonly=True) as uow:
        by_status = uow.documents.status_counts(tenant, dataset)
        segments = uow.segments.count(tenant, dataset)
        cached = uow.embeddings.count(provider, model, tenant)
    return {
        "dataset": dataset,
        "documents": sum(v for k, v in by_status.items() if k != IndexingStatus.DELETED.value),
        "segments": segments,
        "vectors": c.vectors.count(tenant, dataset),
        "keyword_entities": c.keyword_index.count(tenant, dataset),
        "cached_embeddings": cached,
        "by_status": by_status,
        # the model name often starts with the provider's ("sentence-transformers/..."):
        # two fields, not one joined string that repeats it
        "embedding_provider": provider,
        "embedding_model": model,
        "collection": c.vectors.collection,
        "keyword_collection": c.keyword_index.collection,
    }


def document_row(d: Document) -> dict[str, Any]:
    """What `kbstream status` shows of one document."""
    return {
        "document": d.source,
        "document_id": d.document_id,
        "dataset": d.dataset_id,
        "status": d.status.value,
        # Dify's switches: out of search while disabled or archived
        "enabled": d.enabled,
        "archived": d.archived,
        "error": d.error,
        "segments": d.segment_count,
        "version": d.version,
        "embedded": d.embedded_texts,
        "cache_hits": d.cache_hits,
        "segments_added": d.segments_added,
        "segments_kept": d.segments_kept,
        "segments_removed": d.segments_removed,
        "last_dropped": d.last_dropped,
        "updated_at": d.updated_at,
        "completed_at": d.completed_at,
    }


def document_rows(
    c: Container, dataset: str, document_ids: list[str] | None = None
) -> list[dict[str, Any]]:
    """One row per document of ``dataset`` (or only ``document_ids``)."""
    with c.uow(readonly=True) as uow:
        docs = uow.documents.list(c.settings.tenant, dataset, document_ids)
    return [document_row(d) for d in docs]


def datasets_of(c: Container, document_id: str) -> list[str]:
    """The datasets of this tenant holding a document with this id."""
    with c.uow(readonly=True) as uow:
        return [d.dataset_id for d in uow.documents.find(c.settings.tenant, document_id)]


def job_status(c: Container, job_id: str, dataset: str | None = None) -> list[dict[str, Any]]:
    """The batch-import jobs of this tenant called ``job_id`` (in ``dataset``,
    if given): job ids are the clients', so several datasets or documents may
    each have one."""
    with c.uow(readonly=True) as uow:
        return uow.jobs.find(c.settings.tenant, job_id, dataset)
