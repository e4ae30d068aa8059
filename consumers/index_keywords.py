"""index_keywords: segments -> jieba TF-IDF keyword postings, one row per
(dataset, keyword, index_node_id). Reconciles by id like load_vectors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from domain.documents import IndexingStatus
from domain.events import Event, KeywordsIndexed, SegmentsRemoved, SegmentsSplit
from infra.db.repository import Database, DocKey
from infra.kafka.runner import Emit
from infra.kafka.topics import Topics
from infra.keywords import JiebaKeywordExtractor

log = logging.getLogger(__name__)


@dataclass
class IndexKeywordsStage:
    db: Database
    topics: Topics
    keywords: JiebaKeywordExtractor
    name: str = "index_keywords"
    max_batch: int = 16

    @property
    def input_topics(self) -> list[str]:
        return [self.topics.segments]

    def handle(self, events: Sequence[Event]) -> list[Emit]:
        out: list[Emit] = []
        for e in events:
            if isinstance(e, SegmentsSplit):
                out.extend(self._index(e))
            elif isinstance(e, SegmentsRemoved):
                alive = self.db.segments.existing_ids(e.index_node_ids)
                self.db.postings.delete_nodes([i for i in e.index_node_ids if i not in alive])
                if e.whole_document:
                    self.db.postings.delete_document_orphans(
                        DocKey(e.tenant_id, e.dataset_id, e.document_id)
                    )
                out.append(Emit(self.topics.progress, self._progress(e, [])))
        return out

    def _index(self, e: SegmentsSplit) -> list[Emit]:
        ids = [s.index_node_id for s in e.segments]
        alive = self.db.segments.existing_ids(ids)
        postings = {
            (s.index_node_id, e.document_id): self.keywords.extract(
                s.content if not s.answer else f"{s.content}\n{s.answer}"
            )
            for s in e.segments
            if s.index_node_id in alive
        }
        self.db.postings.replace(e.tenant_id, e.dataset_id, postings)
        self.db.postings.delete_nodes([i for i in ids if i not in alive])
        live = [i for i in ids if i in alive]
        if live:
            self.db.segments.mark("keywords_indexed", live)
        # always report: track_status re-checks completion on any progress
        return [Emit(self.topics.progress, self._progress(e, live))]

    @staticmethod
    def _progress(e: Event, ids: list[str]) -> KeywordsIndexed:
        return KeywordsIndexed(
            tenant_id=e.tenant_id,
            dataset_id=e.dataset_id,
            document_id=e.document_id,
            version=e.version,
            index_node_ids=ids,
        )

    def on_dead_letter(self, event: Event, reason: str) -> None:
        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        self.db.documents.set_status(key, event.version, IndexingStatus.ERROR, reason)
