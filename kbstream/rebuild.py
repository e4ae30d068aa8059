"""`kbstream rebuild`: rebuild a dataset's vector collection and keyword
(full-text) index from the stored segments, in place or into another embedding
model's collection (blue/green), while searches keep answering from the
collection the dataset's alias points at.

The source is the segments table, not a replay of the lifecycle topic: it is
the exact current state (no retention needed, no re-parse, no re-split), and
the embedding cache makes an unchanged dataset cost no model call. Replaying
the topic is what `index --force` and upstream re-publishing already do.

Steps: register the target index (``building``, or the serving one when the
model is the same); upsert every alive segment's vector (cache first, misses
embedded with the target model in batches and cached) and upsert its text
into the keyword index with the index_keywords stage itself (a model switch
only rewrites the same texts: one keyword index serves every model); delete
what is not alive from both;
reconcile again until a pass finds nothing (live writes go on meanwhile);
check the target holds exactly the alive segments; move the alias; the old
index retires until its grace period is over (``--drop-retired``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumers.index_keywords import IndexKeywordsStage
from domain.documents import DocKey
from domain.errors import KbstreamError
from domain.events import split_batches
from domain.ports import VectorRow
from domain.vector_indexes import DatasetIndexes, IndexState, IndexTarget, VectorIndexRecord
from infra.embedding import BUNDLED_MODEL_NAME, model_identity
from infra.vectors import MilvusVectorStore, collection_name
from kbstream.bootstrap import Container
from kbstream.serving import dataset_indexes

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
PAGE = 256
MAX_PASSES = 20


class RebuildError(KbstreamError):
    """The rebuild could not finish; the dataset keeps its serving index."""


@dataclass
class RebuildSummary:
    dataset: str
    model: str
    collection: str
    in_place: bool
    segments: int = 0
    vectors_written: int = 0
    embedded: int = 0  # texts sent to the model
    cache_hits: int = 0
    vectors_deleted: int = 0
    keyword_entities: int = 0
    passes: int = 0
    retired: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        how = "in place" if self.in_place else "switched"
        return (
            f"{self.dataset}: {how} to {self.model}: {self.segments} segments, "
            f"{self.vectors_written} vectors written, {self.embedded} texts embedded, "
            f"{self.keyword_entities} keyword entities, {self.seconds:.1f} s"
        )


def target_for(c: Container, model_spec: str | None) -> IndexTarget:
    spec = model_spec or c.model_spec
    folder = Path(spec).expanduser()
    if folder.is_dir() and spec not in (BUNDLED_MODEL_NAME, "all-MiniLM-L6-v2"):
        spec = str(folder.resolve())
    provider, model, dim = model_identity(c.settings.embedding_provider, spec)
    return IndexTarget(provider, model, spec, dim, collection_name(provider, model, dim))


def rebuild(
    c: Container,
    dataset: str,
    model_spec: str | None = None,
    grace_seconds: float | None = None,
    progress: ProgressFn | None = None,
) -> RebuildSummary:
    started = time.perf_counter()
    tenant = c.settings.tenant
    grace = c.settings.retired_grace_seconds if grace_seconds is None else grace_seconds
    target = target_for(c, model_spec)
    with c.uow() as uow:
        rules = DatasetIndexes(tenant, dataset, uow.vector_indexes.for_dataset(tenant, dataset))
        try:
            record = rules.start_building(target, datetime.now(UTC))
        except ValueError as exc:
            raise RebuildError(str(exc)) from exc
        uow.vector_indexes.save(record)
        uow.commit()
    run = _Run(c, dataset, target, record, progress)
    summary = RebuildSummary(
        dataset, target.model, target.collection, in_place=record.state is IndexState.SERVING
    )
    run.summary = summary
    alive = run.alive()
    todo = sorted(alive)
    while True:
        summary.passes += 1
        run.load(todo)
        in_store = set(run.store.ids(tenant, dataset))
        alive = run.alive()
        stale = sorted(in_store - alive)
        # stale ids go last: an in-place rebuild never leaves a search a gap
        run.store.delete(stale)
        summary.vectors_deleted += len(stale)
        texts = run.drop_orphan_keywords(alive)
        todo = sorted(alive - (in_store & texts))
        if not todo and not stale:
            break
        if summary.passes >= MAX_PASSES:
            raise RebuildError(
                f"{dataset} kept changing through {MAX_PASSES} passes; run rebuild again"
            )
    held = set(run.store.ids(tenant, dataset))
    if held != alive:
        raise RebuildError(
            f"{target.collection} holds {len(held)} vectors of {dataset}, not its "
            f"{len(alive)} segments; run rebuild again"
        )
    summary.segments = len(alive)
    # the switch: one alias change for every search, then the registry
    c.vectors.point_alias(tenant, dataset, target.collection)
    now = datetime.now(UTC)
    with c.uow() as uow:
        rules = DatasetIndexes(tenant, dataset, uow.vector_indexes.for_dataset(tenant, dataset))
        for changed in rules.switch_to(target.model, now, grace):
            if changed.model != target.model:
                summary.retired = changed.model
            uow.vector_indexes.save(changed)
        done = DatasetIndexes(tenant, dataset, uow.vector_indexes.for_dataset(tenant, dataset))
        mine = done.of_model(target.model)
        if mine is not None:
            uow.vector_indexes.save(
                replace(mine, progress_done=len(alive), progress_total=len(alive))
            )
        uow.commit()
    summary.keyword_entities = c.keyword_index.count(tenant, dataset)
    summary.seconds = round(time.perf_counter() - started, 2)
    log.info("rebuild: %s", summary.line())
    return summary


class _Run:
    def __init__(
        self,
        c: Container,
        dataset: str,
        target: IndexTarget,
        record: VectorIndexRecord,
        progress: ProgressFn | None,
    ) -> None:
        self.c = c
        self.tenant = c.settings.tenant
        self.dataset = dataset
        self.target = target
        self.record = record
        self.progress = progress
        # a lost collection (and its alias) comes back here
        self.store: MilvusVectorStore = c.vectors.view(target.collection, target.dim, create=True)
        self.keywords = IndexKeywordsStage(c.uow, c.keyword_index)
        self.summary: RebuildSummary
        self.done = 0
        self.total = 0

    def alive(self) -> set[str]:
        """The segments that belong in the indexes: a disabled or archived one
        stays out of the new index too (and out of the keyword index)."""
        with self.c.uow(readonly=True) as uow:
            rows = uow.segments.for_dataset(self.tenant, self.dataset)
        return {i for i, s in rows.items() if s.searchable}

    def load(self, ids: list[str]) -> None:
        self.total = self.done + len(ids)
        with self.c.uow(readonly=True) as uow:
            versions = {
                d.document_id: d.version for d in uow.documents.list(self.tenant, self.dataset)
            }
        for i in range(0, len(ids), PAGE):
            self._page(ids[i : i + PAGE], versions)

    def _page(self, ids: list[str], versions: dict[str, int]) -> None:
        t, s = self.target, self.summary
        with self.c.uow(readonly=True) as uow:
            rows = uow.segments.by_ids(ids)
            cached = uow.embeddings.get_many(
                self.tenant, t.provider, t.model, {r.doc_hash for r in rows.values()}
            )
        texts = {r.doc_hash: r.content for r in rows.values() if r.doc_hash not in cached}
        s.cache_hits += len(rows) - sum(1 for r in rows.values() if r.doc_hash in texts)
        if texts:
            vectors = self.c.provider_for(t).embed(list(texts.values()))
            fresh = dict(zip(texts, vectors, strict=True))
            with self.c.uow() as uow:
                uow.embeddings.put_many(self.tenant, t.provider, t.model, fresh)
                uow.commit()
            cached.update(fresh)
            s.embedded += len(texts)
        s.vectors_written += self.store.upsert(
            [
                VectorRow(
                    node, cached[r.doc_hash], DocKey(self.tenant, self.dataset, r.document_id)
                )
                for node, r in sorted(rows.items())
            ]
        )
        # texts the way index_keywords writes them: it is the same code
        by_document: dict[str, list[Any]] = {}
        for r in rows.values():
            by_document.setdefault(r.document_id, []).append(r)
        events = [
            e
            for doc_id, segs in sorted(by_document.items())
            for e in split_batches(
                self.tenant,
                self.dataset,
                doc_id,
                versions.get(doc_id, 1),
                sorted(segs, key=lambda r: r.position),
                self.c.settings.segments_per_event,
            )
        ]
        if events:
            self.keywords.handle(events)  # its progress events are not needed here
        self.done += len(ids)
        self._report()

    def _report(self) -> None:
        self.record = replace(self.record, progress_done=self.done, progress_total=self.total)
        with self.c.uow() as uow:
            uow.vector_indexes.save(self.record)
            uow.commit()
        if self.progress:
            self.progress(self.done, self.total)

    def drop_orphan_keywords(self, alive: set[str]) -> set[str]:
        """Delete the keyword entities whose segment is gone; the ids left."""
        index = self.c.keyword_index
        held = set(index.ids(self.tenant, self.dataset))
        index.delete(sorted(held - alive))
        return held & alive


def drop_retired(c: Container, dataset: str, now: bool = False) -> list[dict[str, Any]]:
    """Delete retired indexes' vectors of the dataset once past drop_after (or
    ``now``); a collection no alias points at and left empty is dropped too
    (never the configured model's, which workers and fallbacks use)."""
    tenant = c.settings.tenant
    done = []
    for record in dataset_indexes(c, dataset).droppable(datetime.now(UTC), force=now):
        t = record.target
        dropped = False
        if c.vectors.has_collection(t.collection):
            store = c.vectors.view(t.collection, t.dim)
            store.delete_dataset(tenant, dataset)
            if (
                t.collection != c.vectors.collection
                and not store.aliases_of(t.collection)
                and store.count_all() == 0
            ):
                store.drop()
                dropped = True
        with c.uow() as uow:
            uow.vector_indexes.remove(record)
            uow.commit()
        done.append({"model": t.model, "collection": t.collection, "collection_dropped": dropped})
    return done


def index_rows(c: Container, dataset: str) -> list[dict[str, Any]]:
    """The dataset's vector indexes for `status`."""
    rows = [r.to_dict() for r in dataset_indexes(c, dataset).records]
    order = {IndexState.SERVING.value: 0, IndexState.BUILDING.value: 1}
    return sorted(rows, key=lambda r: order.get(str(r["state"]), 2))
