"""load_vectors, over in-memory ports: reconcile by id against the segments
(alive ids upserted, dead ids deleted), whole-document orphans, other models
skipped, a missing cache entry rejected, redelivery harmless."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from consumers.contract import StageResult
from domain.documents import DocKey
from domain.errors import PermanentError, TransientError
from domain.events import EmbeddedRef, Event, SegmentsEmbedded, SegmentsLoaded, SegmentsRemoved
from domain.ports import VectorRow
from domain.vector_indexes import IndexState, IndexTarget, VectorIndexRecord
from tests.fakes import InMemoryVectorIndex, _Segments
from tests.unit.stage_support import (
    DATASET,
    DOC,
    KEY,
    TENANT,
    World,
    created,
    deleted,
    of_type,
    paragraph,
    text_of,
)

P = [paragraph(i) for i in range(4)]


def embedded_world(*paragraphs: str) -> tuple[World, list[Event]]:
    """Segments split and embedded; the events embed sent to load_vectors."""
    world = World()
    parsed = world.parsed(created(text_of(*paragraphs), 1))
    split = world.stage("split").handle([parsed])
    embedded = world.stage("embed").handle([e.event for e in split.emits])
    return world, [e.event for e in embedded.emits]


def load(world: World, events: Sequence[Event]) -> StageResult:
    return world.stage("load_vectors").handle(events)


def flags(world: World) -> dict[str, bool]:
    return {i: s.vector_indexed for i, s in world.segments().items()}


class TestLoad:
    def test_alive_segments_are_upserted_and_flagged(self) -> None:
        world, events = embedded_world(*P[:3])
        result = load(world, events)
        ids = set(world.segments())
        assert set(world.vectors.rows) == ids
        assert all(flags(world).values())
        loaded = of_type(result, SegmentsLoaded)
        assert {i for e in loaded for i in e.index_node_ids} == ids
        assert all(k == KEY for _, k in world.vectors.rows.values())
        with world.uow(readonly=True) as uow:
            (seg,) = [s for s in world.segments().values() if s.position == 0]
            cached = uow.embeddings.get_many(
                TENANT, world.embedder.provider, world.embedder.model, [seg.doc_hash]
            )
        assert world.vectors.rows[seg.index_node_id][0] == [float(x) for x in cached[seg.doc_hash]]

    def test_dead_ids_are_deleted_not_upserted(self) -> None:
        world, events = embedded_world(*P[:2])
        dead = world.ids_by_text()["p1w0"]
        world.vectors.upsert([VectorRow(dead, [0.0] * 16, KEY)])  # e.g. from an earlier delivery
        with world.uow() as uow:
            uow.segments.delete_one(KEY, dead, None)
            uow.commit()
        result = load(world, events)
        assert dead not in world.vectors.rows
        assert set(world.vectors.rows) == set(world.segments())
        assert dead not in {i for e in of_type(result, SegmentsLoaded) for i in e.index_node_ids}

    def test_redelivery_is_harmless(self) -> None:
        world, events = embedded_world(*P[:3])
        first = load(world, events)
        rows = dict(world.vectors.rows)
        again = load(world, events)
        assert world.vectors.rows == rows and len(rows) == 3
        assert [e.index_node_ids for e in of_type(again, SegmentsLoaded)] == [
            e.index_node_ids for e in of_type(first, SegmentsLoaded)
        ]

    def test_vectors_of_another_model_are_skipped(self) -> None:
        world, events = embedded_world(*P[:2])
        other = [
            e.model_copy(update={"model": "other-model"})
            for e in events
            if isinstance(e, SegmentsEmbedded)
        ]
        result = load(world, other)
        assert result.emits == [] and world.vectors.rows == {}

    def test_a_missing_cache_entry_rejects_that_event_only(self) -> None:
        world, events = embedded_world(*P[:3])
        first, second = [e for e in events if isinstance(e, SegmentsEmbedded)]
        broken = first.model_copy(
            update={
                "segments": [
                    EmbeddedRef(index_node_id=first.segments[0].index_node_id, doc_hash="f" * 64)
                ]
            }
        )
        result = load(world, [broken, second])
        (rejection,) = result.rejected
        assert rejection.event is broken and isinstance(rejection.error, PermanentError)
        assert "missing from the embedding cache" in str(rejection.error)
        assert set(world.vectors.rows) == {s.index_node_id for s in second.segments}


class TestRemovals:
    def test_removal_deletes_only_ids_whose_segment_is_gone(self) -> None:
        world, events = embedded_world(*P[:2])
        load(world, events)
        ids = world.ids_by_text()
        with world.uow() as uow:
            uow.segments.delete_one(KEY, ids["p0w0"], None)
            uow.commit()
        removal = SegmentsRemoved(
            tenant_id=TENANT,
            dataset_id=DATASET,
            document_id=DOC,
            version=1,
            index_node_ids=[ids["p0w0"], ids["p1w0"]],  # p1 is alive: kept
        )
        result = load(world, [removal])
        assert set(world.vectors.rows) == {ids["p1w0"]}
        assert [e.index_node_ids for e in of_type(result, SegmentsLoaded)] == [[]]

    def test_whole_document_removal_drops_vectors_it_does_not_name(self) -> None:
        world, events = embedded_world(*P[:2])
        load(world, events)
        world.vectors.upsert([VectorRow("orphan", [0.0] * 16, KEY)])
        world.run(deleted(5), skip=("load_vectors",))
        removal = SegmentsRemoved(
            tenant_id=TENANT,
            dataset_id=DATASET,
            document_id=DOC,
            version=5,
            index_node_ids=[],
            whole_document=True,
        )
        load(world, [removal])
        assert world.vectors.rows == {}

    def test_whole_document_removal_keeps_segments_that_still_exist(self) -> None:
        world, events = embedded_world(*P[:2])
        load(world, events)
        world.vectors.upsert([VectorRow("orphan", [0.0] * 16, KEY)])
        removal = SegmentsRemoved(
            tenant_id=TENANT,
            dataset_id=DATASET,
            document_id=DOC,
            version=1,
            index_node_ids=[],
            whole_document=True,
        )
        load(world, [removal])
        assert set(world.vectors.rows) == set(world.segments())

    def test_upsert_then_removal_in_one_batch_keep_their_order(self) -> None:
        world, events = embedded_world(*P[:2])
        ids = world.ids_by_text()
        with world.uow() as uow:
            uow.segments.delete_one(KEY, ids["p0w0"], None)
            uow.commit()
        removal = SegmentsRemoved(
            tenant_id=TENANT,
            dataset_id=DATASET,
            document_id=DOC,
            version=1,
            index_node_ids=[ids["p0w0"]],
        )
        result = load(world, [*events, removal])
        assert [type(e.event) for e in result.emits] == [SegmentsLoaded] * (len(events) + 1)
        assert set(world.vectors.rows) == {ids["p1w0"]}


def test_load_writes_once_per_batch() -> None:
    world, events = embedded_world(*P[:3])
    commits = world.uow.commits
    load(world, events)
    assert world.uow.commits == commits + 1


class RecordingVectorIndex(InMemoryVectorIndex):
    """The in-memory index, recording every write call in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def upsert(self, rows: Sequence[VectorRow]) -> int:
        self.calls.append(("upsert", len(rows)))
        return super().upsert(rows)

    def delete(self, index_node_ids: Sequence[str]) -> None:
        self.calls.append(("delete", len(index_node_ids)))
        super().delete(index_node_ids)

    def delete_document(self, key: DocKey) -> None:
        self.calls.append(("delete_document", 1))
        super().delete_document(key)


class TestBatchedWrites:
    def test_one_upsert_per_batch_not_per_event(self) -> None:
        world, events = embedded_world(*P[:4])
        world.vectors = RecordingVectorIndex()
        embedded = [e for e in events if isinstance(e, SegmentsEmbedded)]
        assert len(embedded) == 2
        load(world, events)
        assert world.vectors.calls == [("upsert", 4)]
        assert set(world.vectors.rows) == set(world.segments())

    def test_other_documents_do_not_split_the_upsert(self) -> None:
        world, events = embedded_world(*P[:4])
        world.vectors = RecordingVectorIndex()
        other = SegmentsRemoved(
            tenant_id=TENANT,
            dataset_id=DATASET,
            document_id="another-doc",
            version=1,
            index_node_ids=["gone"],
        )
        load(world, [events[0], other, *events[1:]])
        assert [c for c in world.vectors.calls if c[0] == "upsert"] == [("upsert", 4)]

    def test_a_removal_after_an_upsert_of_its_document_wins(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        world, events = embedded_world(*P[:2])
        world.vectors = RecordingVectorIndex()
        # the document was deleted between the batch's two reads: its segments
        # were alive for the upsert, its whole-document removal finds none left
        monkeypatch.setattr(_Segments, "ids_for_document", lambda self, key: set())
        removal = SegmentsRemoved(
            tenant_id=TENANT,
            dataset_id=DATASET,
            document_id=DOC,
            version=5,
            index_node_ids=[],
            whole_document=True,
        )
        load(world, [*events, removal])
        names = [name for name, _ in world.vectors.calls]
        assert names.index("upsert") < names.index("delete_document")
        assert world.vectors.rows == {}


class TestServingModel:
    """load_vectors writes a dataset's vectors only with its serving or building model."""

    def test_a_first_load_registers_the_model_as_serving_with_an_alias(self) -> None:
        world, events = embedded_world(*P[:2])
        load(world, events)
        with world.uow(readonly=True) as uow:
            (record,) = uow.vector_indexes.for_dataset(TENANT, DATASET)
        assert record.state is IndexState.SERVING
        assert record.model == world.embedder.model
        assert world.vectors.aliases == {(TENANT, DATASET): world.vectors.target.collection}

    def test_a_dataset_served_by_another_model_makes_the_events_wait(self) -> None:
        world, events = embedded_world(*P[:2])
        other = IndexTarget("st", "other@abc", "/models/other", 16, "kb_other")
        with world.uow() as uow:
            uow.vector_indexes.add(VectorIndexRecord(TENANT, DATASET, other, IndexState.SERVING))
            uow.commit()
        with pytest.raises(TransientError, match="KBSTREAM_EMBEDDING_MODEL=/models/other"):
            load(world, events)
        assert world.vectors.rows == {} and not any(flags(world).values())

    def test_the_building_model_may_load(self) -> None:
        world, events = embedded_world(*P[:2])
        other = IndexTarget("st", "other@abc", "/models/other", 16, "kb_other")
        mine = world.vectors.target
        with world.uow() as uow:
            uow.vector_indexes.add(VectorIndexRecord(TENANT, DATASET, other, IndexState.SERVING))
            uow.vector_indexes.add(VectorIndexRecord(TENANT, DATASET, mine, IndexState.BUILDING))
            uow.commit()
        load(world, events)
        assert set(world.vectors.rows) == set(world.segments())
        assert world.vectors.aliases == {}  # the rebuild moves the alias, not the worker

    def test_the_registry_is_read_in_the_one_read_only_unit_of_work(self) -> None:
        world, events = embedded_world(*P[:2])
        load(world, events)  # registers
        opened = world.uow.readonly_opened
        load(world, events)
        assert world.uow.readonly_opened == opened + 1
