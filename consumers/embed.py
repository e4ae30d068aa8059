"""embed: segments -> vectors in the embedding cache. Looks up
(provider, model, doc_hash) first and sends only misses to the model, each
distinct text once per batch; forwards removals in order to load_vectors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from domain.events import EmbeddedRef, Event, SegmentsEmbedded, SegmentsRemoved, SegmentsSplit
from domain.ports import EmbeddingProvider
from infra import metrics
from infra.db.repository import Database, DocKey
from infra.kafka.runner import Emit
from infra.kafka.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class EmbedStage:
    db: Database
    topics: Topics
    provider: EmbeddingProvider
    name: str = "embed"
    max_batch: int = 3

    @property
    def input_topics(self) -> list[str]:
        return [self.topics.segments]

    def handle(self, events: Sequence[Event]) -> list[Emit]:
        splits = [e for e in events if isinstance(e, SegmentsSplit)]
        # segments superseded since they were split (update, delete) need no vectors
        alive = self.db.segments.existing_ids([s.index_node_id for e in splits for s in e.segments])
        texts: dict[str, str] = {}
        first_doc: dict[str, tuple[DocKey, int]] = {}
        for e in splits:
            for s in e.segments:
                if s.index_node_id in alive and s.doc_hash not in texts:
                    texts[s.doc_hash] = s.content
                    first_doc[s.doc_hash] = (
                        DocKey(e.tenant_id, e.dataset_id, e.document_id),
                        e.version,
                    )
        cached = self.db.embeddings.get_many(self.provider.provider, self.provider.model, texts)
        misses = [h for h in texts if h not in cached]
        if misses:
            vectors = self.provider.embed([texts[h] for h in misses])
            self.db.embeddings.put_many(
                self.provider.provider, self.provider.model, dict(zip(misses, vectors, strict=True))
            )
        metrics.EMBEDDED_TEXTS.inc(len(misses))

        counts: dict[tuple[DocKey, int], list[int]] = {}
        missed = set(misses)
        out: list[Emit] = []
        for e in events:
            if isinstance(e, SegmentsRemoved):
                out.append(Emit(self.topics.embedded, e))
            elif isinstance(e, SegmentsSplit):
                refs = [
                    EmbeddedRef(index_node_id=s.index_node_id, doc_hash=s.doc_hash)
                    for s in e.segments
                    if s.index_node_id in alive
                ]
                key = (DocKey(e.tenant_id, e.dataset_id, e.document_id), e.version)
                c = counts.setdefault(key, [0, 0])
                for r in refs:
                    if r.doc_hash in missed and first_doc.get(r.doc_hash) == key:
                        c[0] += 1
                        first_doc.pop(r.doc_hash)
                    else:
                        c[1] += 1
                if refs:
                    out.append(
                        Emit(
                            self.topics.embedded,
                            SegmentsEmbedded(
                                tenant_id=e.tenant_id,
                                dataset_id=e.dataset_id,
                                document_id=e.document_id,
                                version=e.version,
                                provider=self.provider.provider,
                                model=self.provider.model,
                                segments=refs,
                            ),
                        )
                    )
        metrics.CACHE_HITS.inc(sum(c[1] for c in counts.values()))
        self.db.documents.add_embedding_counts({k: (v[0], v[1]) for k, v in counts.items()})
        return out

    def on_dead_letter(self, event: Event, reason: str) -> None:
        from domain.documents import IndexingStatus

        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        self.db.documents.set_status(key, event.version, IndexingStatus.ERROR, reason)
