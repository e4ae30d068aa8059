"""index_keywords: segments -> keyword postings, one row per
(dataset, keyword, index_node_id). Reconciles by id like load_vectors: a
segment that still exists gets its postings replaced, one that is gone loses
them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from consumers.contract import StageResult
from domain.events import (
    Event,
    KeywordsIndexed,
    SegmentsRemoved,
    SegmentsSplit,
    Topic,
    resolved_version,
)
from domain.ports import KeywordExtractor, UnitOfWorkFactory

log = logging.getLogger(__name__)


@dataclass
class IndexKeywordsStage:
    uow: UnitOfWorkFactory
    keywords: KeywordExtractor
    name: str = "index_keywords"
    max_batch: int = 16

    def handle(self, events: Sequence[Event]) -> StageResult:
        result = StageResult()
        splits = [e for e in events if isinstance(e, SegmentsSplit)]
        removed = [e for e in events if isinstance(e, SegmentsRemoved)]
        if not (splits or removed):
            return result
        extracted: dict[str, list[tuple[str, float]]] = {}
        if splits:
            with self.uow(readonly=True) as uow:
                alive = uow.segments.alive([s.index_node_id for sp in splits for s in sp.segments])
            # the slow part, outside any transaction
            for sp in splits:
                for s in sp.segments:
                    if s.index_node_id in alive and s.index_node_id not in extracted:
                        text = s.content if not s.answer else f"{s.content}\n{s.answer}"
                        extracted[s.index_node_id] = self.keywords.extract(text)
        with self.uow() as uow:
            # read again under the write: a segment removed meanwhile gets no postings
            every = [s.index_node_id for sp in splits for s in sp.segments]
            alive = uow.segments.alive(every + [i for r in removed for i in r.index_node_ids])
            for e in events:
                if isinstance(e, SegmentsSplit):
                    ids = [s.index_node_id for s in e.segments]
                    live = [i for i in ids if i in alive and i in extracted]
                    if live:
                        uow.postings.replace({(e.doc_key, i): extracted[i] for i in live})
                        uow.segments.mark("keywords_indexed", live)
                    uow.postings.delete_nodes([i for i in ids if i not in alive])
                    # always report: track_status re-checks completion on any progress
                    result.emit(Topic.PROGRESS, _progress(e, live))
                elif isinstance(e, SegmentsRemoved):
                    uow.postings.delete_nodes([i for i in e.index_node_ids if i not in alive])
                    if e.whole_document:
                        uow.postings.delete_document_orphans(e.doc_key)
                    result.emit(Topic.PROGRESS, _progress(e, []))
            uow.commit()
        return result


def _progress(e: Event, ids: list[str]) -> KeywordsIndexed:
    return KeywordsIndexed(
        tenant_id=e.tenant_id,
        dataset_id=e.dataset_id,
        document_id=e.document_id,
        version=resolved_version(e),
        index_node_ids=ids,
    )
