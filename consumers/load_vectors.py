"""load_vectors: cached vectors -> the vector index, upserted by index_node_id.

Reconciles by id against the segments table, which is the source of truth: an
id whose segment row exists is upserted, an id whose row is gone is deleted.
That makes redelivery, replay and reordering harmless.

It writes a dataset's vectors only with the model that serves the dataset or
the one a rebuild is building (domain/vector_indexes.py), and registers the
first model that loads a dataset as its serving one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from consumers.contract import StageResult
from consumers.ownership import own_events
from domain.documents import DocKey
from domain.errors import PermanentError, TransientError
from domain.events import (
    Event,
    SegmentsEmbedded,
    SegmentsLoaded,
    SegmentsRemoved,
    Topic,
    resolved_version,
)
from domain.ports import UnitOfWorkFactory, VectorIndex, VectorRow
from domain.vector_indexes import DatasetIndexes, IndexTarget, VectorIndexRecord

log = logging.getLogger(__name__)


@dataclass
class LoadVectorsStage:
    uow: UnitOfWorkFactory
    vectors: VectorIndex
    provider: str
    model: str
    name: str = "load_vectors"
    max_batch: int = 16

    def handle(self, events: Sequence[Event]) -> StageResult:
        result = StageResult()
        served = {
            i for i, e in enumerate(events) if isinstance(e, SegmentsEmbedded) and self._serves(e)
        }
        embedded = [
            e for i, e in enumerate(events) if i in served and isinstance(e, SegmentsEmbedded)
        ]
        removed = [e for e in events if isinstance(e, SegmentsRemoved)]
        if not (embedded or removed):
            return result
        # every read before the vector index is touched
        with self.uow(readonly=True) as uow:
            ids = [r.index_node_id for e in embedded for r in e.segments]
            ids += [i for e in removed for i in e.index_node_ids]
            owners = uow.segments.owners(ids)
            # a disabled or archived segment is sent like any other and deleted
            alive = uow.segments.searchable(list(owners))
            # nothing is written or deleted for an event naming another document's ids
            kept = {id(e) for e in own_events(events, owners, result)}
            embedded = [e for e in embedded if id(e) in kept]
            removed = [e for e in removed if id(e) in kept]
            hashes: dict[str, set[str]] = {}  # the embedding cache is per tenant
            for emb in embedded:
                mine = hashes.setdefault(emb.tenant_id, set())
                mine.update(r.doc_hash for r in emb.segments if r.index_node_id in alive)
            cached = {
                tenant: uow.embeddings.get_many(tenant, self.provider, self.model, wanted)
                for tenant, wanted in sorted(hashes.items())
                if wanted
            }
            documents = {
                e.doc_key: uow.segments.ids_for_document(e.doc_key)
                for e in removed
                if e.whole_document
            }
            datasets = {(e.tenant_id, e.dataset_id) for e in [*embedded, *removed]}
            registry = uow.vector_indexes.for_datasets(datasets)
        fresh = self._check_models(
            datasets, registry, {(e.tenant_id, e.dataset_id) for e in embedded}
        )
        writes = _Writes(self.vectors)
        loaded: list[str] = []
        for i, e in enumerate(events):
            if id(e) not in kept:
                continue
            if isinstance(e, SegmentsEmbedded) and i in served:
                ids_loaded = self._load(e, alive, cached.get(e.tenant_id, {}), result, writes)
                if ids_loaded is not None:
                    loaded.extend(ids_loaded)
                    # always report: track_status re-checks completion on any progress
                    result.emit(Topic.PROGRESS, _progress(e, ids_loaded))
            elif isinstance(e, SegmentsRemoved):
                # a document's events stay in order: its pending upserts go first,
                # so a removal after them in the batch wins
                writes.before_removal(e.doc_key)
                self.vectors.delete([n for n in e.index_node_ids if n not in alive])
                if e.whole_document:
                    self._drop_orphans(e.doc_key, documents[e.doc_key])
                result.emit(Topic.PROGRESS, _progress(e, []))
        writes.flush()
        if loaded or fresh:
            with self.uow() as uow:
                uow.segments.mark("vector_indexed", loaded)
                for record in fresh:
                    uow.vector_indexes.add(record)  # a concurrent first load may win
                uow.commit()
        return result

    def _check_models(
        self,
        datasets: set[tuple[str, str]],
        registry: dict[tuple[str, str], list[VectorIndexRecord]],
        loading: set[tuple[str, str]],
    ) -> list[VectorIndexRecord]:
        """Refuse (transiently: the events wait) to write a dataset's vectors
        with a model that neither serves it nor is being built for it; give a
        first-loaded dataset its alias. Returns the serving records to register."""
        mine = self.vectors.target
        target = IndexTarget(self.provider, self.model, mine.model_spec, mine.dim, mine.collection)
        fresh = []
        for tenant, dataset in sorted(datasets):
            rules = DatasetIndexes(tenant, dataset, registry.get((tenant, dataset), []))
            if not rules.may_load(self.model):
                serving = rules.serving or rules.building
                assert serving is not None
                raise TransientError(
                    f"dataset {dataset!r} is served by embedding model {serving.model}, "
                    f"not {self.model}: restart this worker with "
                    f"KBSTREAM_EMBEDDING_MODEL={serving.target.model_spec} "
                    "(its events wait, none is lost)"
                )
            if not rules.registered and (tenant, dataset) in loading:
                self.vectors.ensure_alias(tenant, dataset)
                fresh.append(rules.first_serving(target, datetime.now(UTC)))
        return fresh

    def _serves(self, e: SegmentsEmbedded) -> bool:
        if (e.provider, e.model) == (self.provider, self.model):
            return True
        log.warning(
            "load_vectors: skipping vectors of %s/%s (this loader serves %s/%s)",
            e.provider,
            e.model,
            self.provider,
            self.model,
        )
        return False

    def _load(
        self,
        e: SegmentsEmbedded,
        alive: set[str],
        cached: dict[str, Any],
        result: StageResult,
        writes: _Writes,
    ) -> list[str] | None:
        live = [r for r in e.segments if r.index_node_id in alive]
        missing = [r.doc_hash for r in live if r.doc_hash not in cached]
        if missing:
            result.reject(
                e,
                PermanentError(
                    f"{len(missing)} vector(s) missing from the embedding cache "
                    f"(first {missing[0]}); re-publish the document"
                ),
            )
            return None
        key = e.doc_key
        writes.upsert(
            key,
            [
                VectorRow(index_node_id=r.index_node_id, vector=cached[r.doc_hash], key=key)
                for r in live
            ],
        )
        writes.delete([r.index_node_id for r in e.segments if r.index_node_id not in alive])
        return [r.index_node_id for r in live]

    def _drop_orphans(self, key: DocKey, alive: set[str]) -> None:
        """After a document delete, no vector of it may outlive its segment rows,
        including ones the event does not name (a crash between writes)."""
        if not alive:
            self.vectors.delete_document(key)
            return
        stored = self.vectors.ids_for_document(key)
        self.vectors.delete([i for i in stored if i not in alive])


class _Writes:
    """The batch's vector writes, gathered so the index sees one upsert (and one
    delete) per batch instead of one per event. The ids written and the ids
    deleted are disjoint (one ``alive`` snapshot decides both), so only a
    removal event, which also deletes by document, has to wait for them."""

    def __init__(self, vectors: VectorIndex) -> None:
        self.vectors = vectors
        self.rows: list[VectorRow] = []
        self.dead: list[str] = []
        self.documents: set[DocKey] = set()

    def upsert(self, key: DocKey, rows: list[VectorRow]) -> None:
        self.rows.extend(rows)
        if rows:
            self.documents.add(key)

    def delete(self, ids: list[str]) -> None:
        self.dead.extend(ids)

    def before_removal(self, key: DocKey) -> None:
        if key in self.documents:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.vectors.upsert(self.rows)
        if self.dead:
            self.vectors.delete(self.dead)
        self.rows, self.dead = [], []
        self.documents.clear()


def _progress(e: Event, ids: list[str]) -> SegmentsLoaded:
    return SegmentsLoaded(
        tenant_id=e.tenant_id,
        dataset_id=e.dataset_id,
        document_id=e.document_id,
        version=resolved_version(e),
        index_node_ids=ids,
    )
