"""track_status: joins the two branches. A document is completed when every
segment of its current version is both in Milvus and in the keyword postings;
the check reads flags, not event counts, so duplicates cannot fool it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from domain.events import Event
from infra.db.repository import Database, DocKey
from infra.kafka.runner import Emit
from infra.kafka.topics import Topics


@dataclass
class TrackStatusStage:
    db: Database
    topics: Topics
    name: str = "track_status"
    max_batch: int = 64

    @property
    def input_topics(self) -> list[str]:
        return [self.topics.progress]

    def handle(self, events: Sequence[Event]) -> list[Emit]:
        latest: dict[DocKey, int] = {}
        for e in events:
            key = DocKey(e.tenant_id, e.dataset_id, e.document_id)
            latest[key] = max(latest.get(key, 0), e.version)
        current = self.db.documents.versions(latest)
        for key, state in current.items():
            self.db.documents.try_complete(key, state.version)
        return []

    def on_dead_letter(self, event: Event, reason: str) -> None:
        return None
