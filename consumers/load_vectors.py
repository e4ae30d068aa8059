"""load_vectors: cached vectors -> Milvus, upserted by index_node_id.

Reconciles by id against the segments table, which is the source of truth: an
id whose segment row exists is upserted, an id whose row is gone is deleted.
That makes redelivery, replay and reordering harmless."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from domain.documents import IndexingStatus
from domain.errors import PermanentError
from domain.events import Event, SegmentsEmbedded, SegmentsLoaded, SegmentsRemoved
from infra.db.repository import Database, DocKey
from infra.kafka.runner import Emit
from infra.kafka.topics import Topics
from infra.vectors import MilvusVectorStore, VectorRow

log = logging.getLogger(__name__)


@dataclass
class LoadVectorsStage:
    db: Database
    topics: Topics
    vectors: MilvusVectorStore
    provider: str
    model: str
    name: str = "load_vectors"
    max_batch: int = 16

    @property
    def input_topics(self) -> list[str]:
        return [self.topics.embedded]

    def handle(self, events: Sequence[Event]) -> list[Emit]:
        out: list[Emit] = []
        # events of one document stay in order; apply them one by one
        for e in events:
            if isinstance(e, SegmentsEmbedded):
                out.extend(self._load(e))
            elif isinstance(e, SegmentsRemoved):
                alive = self.db.segments.existing_ids(e.index_node_ids)
                self.vectors.delete([i for i in e.index_node_ids if i not in alive])
                if e.whole_document:
                    self._drop_orphans(e)
                out.append(Emit(self.topics.progress, self._progress(e, [])))
        return out

    def _load(self, e: SegmentsEmbedded) -> list[Emit]:
        if (e.provider, e.model) != (self.provider, self.model):
            log.warning(
                "load_vectors: skipping vectors of %s/%s (this loader serves %s/%s)",
                e.provider,
                e.model,
                self.provider,
                self.model,
            )
            return []
        ids = [r.index_node_id for r in e.segments]
        alive = self.db.segments.existing_ids(ids)
        dead = [i for i in ids if i not in alive]
        live = [r for r in e.segments if r.index_node_id in alive]
        vectors = self.db.embeddings.get_many(e.provider, e.model, {r.doc_hash for r in live})
        missing = [r.doc_hash for r in live if r.doc_hash not in vectors]
        if missing:
            raise PermanentError(
                f"{len(missing)} vector(s) missing from the embedding cache (first {missing[0]}); "
                "re-publish the document"
            )
        rows = [
            VectorRow(
                index_node_id=r.index_node_id,
                vector=vectors[r.doc_hash],
                tenant_id=e.tenant_id,
                dataset_id=e.dataset_id,
                document_id=e.document_id,
            )
            for r in live
        ]
        self.vectors.upsert(rows)
        self.vectors.delete(dead)
        if live:
            self.db.segments.mark("vector_indexed", [r.index_node_id for r in live])
        # always report: track_status re-checks completion on any progress
        return [Emit(self.topics.progress, self._progress(e, [r.index_node_id for r in live]))]

    @staticmethod
    def _progress(e: Event, ids: list[str]) -> SegmentsLoaded:
        return SegmentsLoaded(
            tenant_id=e.tenant_id,
            dataset_id=e.dataset_id,
            document_id=e.document_id,
            version=e.version,
            index_node_ids=ids,
        )

    def _drop_orphans(self, e: SegmentsRemoved) -> None:
        """After a document delete, no vector of it may outlive its segment rows,
        including ones this event does not name (a crash between writes)."""
        key = DocKey(e.tenant_id, e.dataset_id, e.document_id)
        alive = self.db.segments.ids_for_document(key)
        if not alive:
            self.vectors.delete_document(e.tenant_id, e.dataset_id, e.document_id)
            return
        stored = self.vectors.ids_for_document(e.tenant_id, e.dataset_id, e.document_id)
        self.vectors.delete([i for i in stored if i not in alive])

    def on_dead_letter(self, event: Event, reason: str) -> None:
        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        self.db.documents.set_status(key, event.version, IndexingStatus.ERROR, reason)
