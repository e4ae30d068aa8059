"""embed: segments -> vectors in the embedding cache. Looks up
(tenant, provider, model, doc_hash) first and sends only misses to the model,
each distinct text once per batch; forwards removals in order to load_vectors.
The cache and the counts are per tenant: a text another tenant embedded is a
miss (and counts as embedded) here, so hits reveal nothing across tenants.

prefetch() runs the model on the next batch's misses while this batch is
written and published (infra/kafka/lookahead.py). Its vectors are kept in
memory for the next two batches, keyed by doc_hash (the text's hash, so a
kept vector is right for any segment with that hash); handle() takes misses
from there before calling the model, and writes exactly what it would have
written without them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from consumers.contract import Rejection, StageResult
from consumers.ownership import own_events
from domain.documents import DocKey
from domain.events import (
    EmbeddedRef,
    Event,
    SegmentsEmbedded,
    SegmentsRemoved,
    SegmentsSplit,
    Topic,
)
from domain.ports import EmbeddingProvider, UnitOfWorkFactory

log = logging.getLogger(__name__)

DocVersion = tuple[DocKey, int]
TenantText = tuple[str, str]  # (tenant_id, doc_hash): the cache's key within a model


@dataclass
class _Wanted:
    """What a batch needs from the model, read before any model call."""

    texts: dict[TenantText, str]  # -> text, for every alive segment
    misses: list[TenantText]  # what the tenants' caches lack, in order
    alive: set[str]  # index_node_ids not superseded since they were split
    first_doc: dict[TenantText, DocVersion]  # which document asked for each text first
    events: list[Event]  # the batch less the events naming another document's segments
    rejected: list[Rejection]


@dataclass
class EmbedStage:
    uow: UnitOfWorkFactory
    embedder: EmbeddingProvider
    max_batch: int = 3
    name: str = "embed"
    # vectors prefetch() made for the batch being handled and the next one
    _ahead: list[dict[str, Sequence[float]]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def prefetch(self, events: Sequence[Event]) -> None:
        wanted = self._wanted(events)
        # a text the batch before holds is in the cache by the time this one is handled
        new = self._embed(wanted, [m for m in wanted.misses if self._kept(m[1]) is None])
        with self._lock:
            self._ahead = [*self._ahead[-1:], new]

    def handle(self, events: Sequence[Event]) -> StageResult:
        result = StageResult()
        provider, model = self.embedder.provider, self.embedder.model
        wanted = self._wanted(events)
        misses, alive, first_doc = wanted.misses, wanted.alive, wanted.first_doc
        result.rejected.extend(wanted.rejected)
        ready = {h: v for _, h in misses if (v := self._kept(h)) is not None}
        ready.update(self._embed(wanted, [m for m in misses if m[1] not in ready]))

        counts: dict[DocVersion, list[int]] = {}  # [embedded here, cache hits]
        missed = set(misses)
        for e in wanted.events:
            if isinstance(e, SegmentsRemoved):
                result.emit(Topic.EMBEDDED, e)
            elif isinstance(e, SegmentsSplit):
                refs = [
                    EmbeddedRef(index_node_id=s.index_node_id, doc_hash=s.doc_hash)
                    for s in e.segments
                    if s.index_node_id in alive
                ]
                key = (e.doc_key, e.version)
                c = counts.setdefault(key, [0, 0])
                for r in refs:
                    # a text embedded now counts once per tenant, for its first
                    # document that asked; every other use of it is a cache hit
                    t = (e.tenant_id, r.doc_hash)
                    if t in missed and first_doc.get(t) == key:
                        c[0] += 1
                        first_doc.pop(t)
                    else:
                        c[1] += 1
                if refs:
                    result.emit(
                        Topic.EMBEDDED,
                        SegmentsEmbedded(
                            tenant_id=e.tenant_id,
                            dataset_id=e.dataset_id,
                            document_id=e.document_id,
                            version=e.version,
                            provider=provider,
                            model=model,
                            segments=refs,
                        ),
                    )
        result.count("embedded_texts", len(misses))
        result.count("cache_hits", sum(c[1] for c in counts.values()))
        if misses or counts:
            self._write({m: ready[m[1]] for m in misses}, counts)
        return result

    def _wanted(self, events: Sequence[Event]) -> _Wanted:
        splits = [e for e in events if isinstance(e, SegmentsSplit)]
        verdict = StageResult()
        with self.uow(readonly=True) as uow:
            owners = uow.segments.owners([s.index_node_id for sp in splits for s in sp.segments])
            kept = own_events(events, owners, verdict)
            splits = [e for e in kept if isinstance(e, SegmentsSplit)]
            # segments superseded since they were split (update, delete) need no vectors
            alive = set(owners)
            texts: dict[TenantText, str] = {}
            first_doc: dict[TenantText, DocVersion] = {}
            for sp in splits:
                for s in sp.segments:
                    t = (sp.tenant_id, s.doc_hash)
                    if s.index_node_id in alive and t not in texts:
                        texts[t] = s.content
                        first_doc[t] = (sp.doc_key, sp.version)
            provider, model = self.embedder.provider, self.embedder.model
            cached: set[TenantText] = set()
            for tenant in sorted({tenant for tenant, _ in texts}):
                hashes = [h for t, h in texts if t == tenant]
                cached.update(
                    (tenant, h) for h in uow.embeddings.get_many(tenant, provider, model, hashes)
                )
        misses = [t for t in texts if t not in cached]
        return _Wanted(texts, misses, alive, first_doc, kept, verdict.rejected)

    def _embed(self, wanted: _Wanted, misses: list[TenantText]) -> dict[str, Sequence[float]]:
        """Vectors by doc_hash: a text two tenants lack goes to the model once."""
        todo = {h: wanted.texts[(tenant, h)] for tenant, h in misses}
        if not todo:
            return {}
        vectors = self.embedder.embed(list(todo.values()))
        return dict(zip(todo, vectors, strict=True))

    def _kept(self, doc_hash: str) -> Sequence[float] | None:
        with self._lock:
            return next((kept[doc_hash] for kept in self._ahead if doc_hash in kept), None)

    def _write(
        self, vectors: dict[TenantText, Sequence[float]], counts: dict[DocVersion, list[int]]
    ) -> None:
        with self.uow() as uow:
            for tenant in sorted({tenant for tenant, _ in vectors}):
                mine = {h: v for (t, h), v in vectors.items() if t == tenant}
                uow.embeddings.put_many(tenant, self.embedder.provider, self.embedder.model, mine)
            counted = sorted(
                (kv for kv, (embedded, hits) in counts.items() if embedded or hits),
                key=lambda kv: (str(kv[0]), kv[1]),
            )
            # the batch's documents in one locking read (one lock order) and one write
            docs = uow.documents.get_many({key for key, _ in counted}, for_update=True)
            changed = {}
            for key, version in counted:
                embedded, hits = counts[(key, version)]
                doc = docs.get(key)
                if doc is not None and doc.count_embeddings(version, embedded, hits):
                    changed[key] = doc
            uow.documents.save_many(list(changed.values()))
            uow.commit()
