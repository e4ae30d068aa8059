"""track_status: joins the two branches. A document is completed when every
segment of its current version is flagged by both branches, and Milvus and
the keyword postings hold exactly its segments (removals included). The check
reads state, not event counts, so duplicates and reordering cannot fool it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from domain.documents import IndexingStatus
from domain.events import Event
from infra.db.repository import Database, DocKey
from infra.kafka.runner import Emit
from infra.kafka.topics import Topics
from infra.vectors import MilvusVectorStore


@dataclass
class TrackStatusStage:
    db: Database
    topics: Topics
    vectors: MilvusVectorStore
    name: str = "track_status"
    max_batch: int = 64

    @property
    def input_topics(self) -> list[str]:
        return [self.topics.progress]

    def handle(self, events: Sequence[Event]) -> list[Emit]:
        keys = {DocKey(e.tenant_id, e.dataset_id, e.document_id) for e in events}
        for key, state in self.db.documents.versions(keys).items():
            if state.status is not IndexingStatus.INDEXING:
                continue
            # cheap flag count first; the store comparison only when it could complete
            if self.db.segments.pending_count(key) == 0 and self._stores_agree(key):
                self.db.documents.try_complete(key, state.version)
        return []

    def _stores_agree(self, key: DocKey) -> bool:
        segments = self.db.segments.ids_for_document(key)
        postings = self.db.postings.nodes_for_document(key)
        if not postings <= segments:
            return False
        vectors = set(self.vectors.ids_for_document(key.tenant_id, key.dataset_id, key.document_id))
        return vectors == segments

    def on_dead_letter(self, event: Event, reason: str) -> None:
        return None
