"""`kbstream purge`: remove what deleted documents still leave behind.

A delete removes a document's segments, uploads, parsed payloads, vectors and
keyword entities, and the cached embeddings only it used. What stays is the
documents row, a tombstone whose version fences off late events, plus the
texts around it: its source name and last error, the errors of its batch-
import jobs (which may quote a segment), and cached embeddings of texts its
earlier versions had. Purging blanks the tombstone's texts, removes its job
records and prunes every cached embedding no segment of the tenant uses. The
vector and keyword indexes are not touched: the delete already emptied them
(`kbstream verify --repair` converges any drift). Each step is one repository
call over many documents, so a later `dataset.deleted` can reuse them for a
whole dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kbstream.bootstrap import Container


@dataclass
class PurgeReport:
    dataset: str
    documents: list[str] = field(default_factory=list)  # tombstones blanked
    # deleted, but the delete has not reached split yet (segments remain): run again later
    pending: list[str] = field(default_factory=list)
    jobs_removed: int = 0
    cache_entries_removed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def purge(c: Container, dataset: str, document_ids: list[str] | None = None) -> PurgeReport:
    """Purge the deleted documents of ``dataset`` (or only ``document_ids``)."""
    tenant = c.settings.tenant
    report = PurgeReport(dataset)
    with c.uow() as uow:
        docs = [d for d in uow.documents.list(tenant, dataset, document_ids) if d.deleted]
        settled = [d for d in docs if not d.segment_count]
        report.pending = sorted(d.document_id for d in docs if d.segment_count)
        for d in settled:
            if d.forget():
                uow.documents.save(d)
        report.documents = sorted(d.document_id for d in settled)
        if settled:
            report.jobs_removed = uow.jobs.delete(tenant, dataset, report.documents)
        # texts of earlier versions and of other deleted documents too
        report.cache_entries_removed = uow.embeddings.prune(tenant)
        uow.commit()
    return report
