"""index_keywords: segments -> the full-text (BM25) keyword index, one entity
per segment keyed by index_node_id. Reconciles by id against the segments
table like load_vectors: a segment that still exists is upserted with its text
(the index tokenizes and weighs it), one that is gone is deleted. So
redelivery, replay and reordering are harmless."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from consumers.contract import StageResult
from consumers.ownership import own_events
from domain.documents import DocKey
from domain.events import (
    Event,
    KeywordsIndexed,
    SegmentsRemoved,
    SegmentsSplit,
    Topic,
    resolved_version,
)
from domain.ports import KeywordIndex, KeywordRow, UnitOfWorkFactory

log = logging.getLogger(__name__)


@dataclass
class IndexKeywordsStage:
    uow: UnitOfWorkFactory
    index: KeywordIndex
    name: str = "index_keywords"
    max_batch: int = 16

    def handle(self, events: Sequence[Event]) -> StageResult:
        result = StageResult()
        splits = [e for e in events if isinstance(e, SegmentsSplit)]
        removed = [e for e in events if isinstance(e, SegmentsRemoved)]
        if not (splits or removed):
            return result
        # every read before the index is touched
        with self.uow(readonly=True) as uow:
            ids = [s.index_node_id for sp in splits for s in sp.segments]
            owners = uow.segments.owners(ids + [i for r in removed for i in r.index_node_ids])
            # a disabled or archived segment is sent like any other and deleted
            alive = uow.segments.searchable(list(owners))
            # nothing is written or deleted for an event naming another document's ids
            events = own_events(events, owners, result)
            removed = [e for e in events if isinstance(e, SegmentsRemoved)]
            documents = {
                e.doc_key: uow.segments.ids_for_document(e.doc_key)
                for e in removed
                if e.whole_document
            }
        rows: list[KeywordRow] = []
        dead: list[str] = []
        indexed: list[str] = []
        pending: set[DocKey] = set()
        for e in events:
            if isinstance(e, SegmentsSplit):
                live = [s for s in e.segments if s.index_node_id in alive]
                rows.extend(
                    KeywordRow(
                        s.index_node_id,
                        e.doc_key,
                        s.content if not s.answer else f"{s.content}\n{s.answer}",
                    )
                    for s in live
                )
                if live:
                    pending.add(e.doc_key)
                dead.extend(s.index_node_id for s in e.segments if s.index_node_id not in alive)
                indexed.extend(s.index_node_id for s in live)
                # always report: track_status re-checks completion on any progress
                result.emit(Topic.PROGRESS, _progress(e, [s.index_node_id for s in live]))
            elif isinstance(e, SegmentsRemoved):
                # a document's events stay in order: its pending upserts go first
                if e.doc_key in pending:
                    rows, dead = self._flush(rows, dead)
                    pending.clear()
                self.index.delete([i for i in e.index_node_ids if i not in alive])
                if e.whole_document:
                    self._drop_orphans(e.doc_key, documents[e.doc_key])
                result.emit(Topic.PROGRESS, _progress(e, []))
        self._flush(rows, dead)
        if indexed:
            with self.uow() as uow:
                uow.segments.mark("keywords_indexed", indexed)
                uow.commit()
        return result

    def _flush(self, rows: list[KeywordRow], dead: list[str]) -> tuple[list[KeywordRow], list[str]]:
        """One upsert and one delete for the batch (the ids are disjoint: one
        ``alive`` snapshot decides both)."""
        self.index.upsert(rows)
        self.index.delete(dead)
        return [], []

    def _drop_orphans(self, key: DocKey, alive: set[str]) -> None:
        """After a document delete, no entity of it may outlive its segment
        rows, including ones the event does not name (a crash between writes)."""
        if not alive:
            self.index.delete_document(key)
            return
        self.index.delete([i for i in self.index.ids_for_document(key) if i not in alive])


def _progress(e: Event, ids: list[str]) -> KeywordsIndexed:
    return KeywordsIndexed(
        tenant_id=e.tenant_id,
        dataset_id=e.dataset_id,
        document_id=e.document_id,
        version=resolved_version(e),
        index_node_ids=ids,
    )
