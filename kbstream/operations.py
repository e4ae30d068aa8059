"""Dify's document and segment operations, for the CLI and the HTTP API:
build the lifecycle event with the document's current version, publish it,
and wait until the document shows it (kbstream.publishing.publish_until).
The pipeline does the work; this module only asks and waits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from consumers.contract import Emit
from domain.claim_check import dataset_prefix
from domain.documents import DocKey, Document
from domain.errors import PermanentError
from domain.events import (
    DOCUMENT_SWITCHES,
    SWITCH_STATE,
    DatasetDeleted,
    Event,
    SegmentDisabled,
    SegmentEnabled,
    SegmentUpdated,
    Topic,
)
from domain.ports import UnitOfWork
from domain.segments import compute_doc_hash
from kbstream.publishing import held_by_indexes, publish_until
from kbstream.purge import PurgeReport, purge

if TYPE_CHECKING:
    from kbstream.bootstrap import Container

DocumentAction = Literal["disable", "enable", "archive", "unarchive"]
SegmentAction = Literal["disable", "enable"]


def _documents(c: Container, dataset: str, document_ids: list[str]) -> dict[str, Document]:
    with c.uow(readonly=True) as uow:
        docs = {
            d.document_id: d for d in uow.documents.list(c.settings.tenant, dataset, document_ids)
        }
    missing = sorted(set(document_ids) - {i for i, d in docs.items() if not d.deleted})
    if missing:
        raise PermanentError(f"no document {', '.join(missing)} in dataset {dataset!r}")
    return docs


def _settled(doc: Document | None) -> bool:
    """The document finished what it was doing and both indexes followed."""
    return doc is not None and doc.status.finished and not doc.deleted


def switch_documents(
    c: Container,
    dataset: str,
    document_ids: list[str],
    action: DocumentAction,
    timeout: float | None = None,
) -> list[Document]:
    """disable / enable / archive / unarchive documents; returns them once
    each shows the switch and is finished (the indexes followed)."""
    docs = _documents(c, dataset, document_ids)
    kind = DOCUMENT_SWITCHES[action]
    enabled, archived = SWITCH_STATE[kind.model_fields["type"].default]
    tenant = c.settings.tenant
    emits = [
        Emit(
            Topic.LIFECYCLE,
            kind(
                tenant_id=tenant, dataset_id=dataset, document_id=d.document_id, version=d.version
            ),
        )
        for d in docs.values()
    ]

    def done(run: Container, uow: UnitOfWork) -> bool:
        now = uow.documents.get_many(DocKey(tenant, dataset, i) for i in docs)
        return len(now) == len(docs) and all(
            _settled(d)
            and (enabled is None or d.enabled == enabled)
            and (archived is None or d.archived == archived)
            for d in now.values()
        )

    publish_until(c, emits, done, timeout, client_id="kbstream-documents")
    with c.uow(readonly=True) as uow:
        return list(uow.documents.get_many(DocKey(tenant, dataset, i) for i in docs).values())


def _segment_event_fields(
    c: Container, dataset: str, document_id: str, index_node_id: str | None, segment_id: int | None
) -> tuple[Document, dict[str, Any]]:
    if (index_node_id is None) == (segment_id is None):
        raise PermanentError("give exactly one of --index-node-id and --segment-id")
    doc = _documents(c, dataset, [document_id])[document_id]
    with c.uow(readonly=True) as uow:
        row = uow.segments.find(doc.key, index_node_id, segment_id)
    if row is None:
        raise PermanentError(
            f"no segment {index_node_id or segment_id} in document {document_id!r}"
        )
    fields: dict[str, Any] = {
        "tenant_id": doc.tenant_id,
        "dataset_id": dataset,
        "document_id": document_id,
        "version": doc.version,
        "index_node_id": index_node_id,
        "segment_id": segment_id,
    }
    return doc, fields


def switch_segment(
    c: Container,
    dataset: str,
    document_id: str,
    action: SegmentAction,
    index_node_id: str | None = None,
    segment_id: int | None = None,
    timeout: float | None = None,
) -> Document:
    """disable / enable one segment; returns its document once the segment
    shows the switch and the document is finished."""
    doc, fields = _segment_event_fields(c, dataset, document_id, index_node_id, segment_id)
    event: Event = (SegmentDisabled if action == "disable" else SegmentEnabled)(**fields)
    want = action == "enable"

    def done(run: Container, uow: UnitOfWork) -> bool:
        row = uow.segments.find(doc.key, index_node_id, segment_id)
        return row is not None and row.enabled == want and _settled(uow.documents.get(doc.key))

    publish_until(c, [Emit(Topic.LIFECYCLE, event)], done, timeout, client_id="kbstream-segments")
    return _document(c, doc.key)


def update_segment(
    c: Container,
    dataset: str,
    document_id: str,
    content: str,
    answer: str | None = None,
    index_node_id: str | None = None,
    segment_id: int | None = None,
    timeout: float | None = None,
) -> Document:
    """New text for one segment; returns its document once a segment of it
    holds that text and the document is finished (both indexes followed)."""
    doc, fields = _segment_event_fields(c, dataset, document_id, index_node_id, segment_id)
    with c.uow(readonly=True) as uow:
        row = uow.segments.find(doc.key, index_node_id, segment_id)
    assert row is not None
    doc_hash = compute_doc_hash(content, answer, row.parent)
    event = SegmentUpdated(**fields, content=content, answer=answer)

    def done(run: Container, uow: UnitOfWork) -> bool:
        _, hashes = uow.segments.hashes(doc.key)  # every row, a disabled one too
        return doc_hash in hashes and _settled(uow.documents.get(doc.key))

    publish_until(c, [Emit(Topic.LIFECYCLE, event)], done, timeout, client_id="kbstream-segments")
    return _document(c, doc.key)


def _document(c: Container, key: DocKey) -> Document:
    with c.uow(readonly=True) as uow:
        doc = uow.documents.get(key)
    assert doc is not None
    return doc


@dataclass
class DatasetDeleteReport:
    dataset: str
    documents: list[str] = field(default_factory=list)  # deleted by this dataset.deleted
    purged: PurgeReport | None = None
    # live documents of the dataset afterwards: created by events queued on other
    # partitions before the delete (it is keyed by the dataset); run it again
    remaining: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def delete_dataset(c: Container, dataset: str, timeout: float | None = None) -> DatasetDeleteReport:
    """Publish dataset.deleted, wait until every document of the dataset is
    deleted and both indexes dropped it, then purge what the tombstones still
    say (kbstream.purge): afterwards no text of the dataset is in the database."""
    tenant = c.settings.tenant
    with c.uow(readonly=True) as uow:
        before = uow.documents.list(tenant, dataset)
    report = DatasetDeleteReport(dataset, sorted(d.document_id for d in before if not d.deleted))
    keys = [d.key for d in before]

    def done(run: Container, uow: UnitOfWork) -> bool:
        docs = uow.documents.get_many(keys)
        return all(d.delete_settled(held_by_indexes(run, d)) for d in docs.values())

    event = DatasetDeleted(tenant_id=tenant, dataset_id=dataset)
    publish_until(c, [Emit(Topic.LIFECYCLE, event)], done, timeout, client_id="kbstream-datasets")
    report.purged = purge(c, dataset)
    with c.uow() as uow:
        live = [d.document_id for d in uow.documents.list(tenant, dataset) if not d.deleted]
        if not live:
            # uploads no document ever claimed (an `index` whose events never ran)
            uow.payloads.delete_prefix(dataset_prefix(tenant, dataset))
            uow.commit()
    report.remaining = sorted(live)
    return report
