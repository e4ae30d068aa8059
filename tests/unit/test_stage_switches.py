"""Issue 19 over in-memory ports: Dify's document and segment switches,
segment edits and dataset deletes, through every stage of the pipeline
table: version-fenced, idempotent under redelivery, and the indexes holding
exactly the searchable segments."""

from __future__ import annotations

from typing import Any

from domain.documents import DocKey, IndexingStatus
from domain.events import (
    DatasetDeleted,
    DocumentArchived,
    DocumentDisabled,
    DocumentEnabled,
    DocumentUnarchived,
    Event,
    SegmentDisabled,
    SegmentEnabled,
    SegmentUpdated,
)
from tests.unit.stage_support import (
    DATASET,
    DOC,
    KEY,
    TENANT,
    World,
    created,
    imported,
    paragraph,
    text_of,
    updated,
)

S = IndexingStatus
P = [paragraph(i) for i in range(4)]
IDS: dict[str, Any] = {"tenant_id": TENANT, "dataset_id": DATASET, "document_id": DOC}


def completed_world() -> World:
    world = World()
    assert world.run(created(text_of(*P), 1)) == []
    assert world.doc().status is S.COMPLETED and world.consistent()
    return world


def all_rows(world: World, key: DocKey = KEY) -> dict[str, Any]:
    """Every segment row of the document, searchable or not."""
    with world.uow(readonly=True) as uow:
        return {
            i: s
            for i, s in uow.segments.for_dataset(key.tenant_id, key.dataset_id).items()
            if s.document_id == key.document_id
        }


def indexed(world: World, key: DocKey = KEY) -> tuple[set[str], set[str]]:
    return set(world.vectors.ids_for_document(key)), world.texts(key)


def searchable_hits(world: World, ids: list[str]) -> set[str]:
    with world.uow(readonly=True) as uow:
        return set(uow.segments.in_dataset(TENANT, DATASET, ids))


class TestDocumentSwitches:
    def test_disable_empties_both_indexes_and_keeps_rows_and_cache(self) -> None:
        world = completed_world()
        rows = all_rows(world)
        assert world.run(DocumentDisabled(**IDS)) == []
        doc = world.doc()
        assert (doc.enabled, doc.status) == (False, S.COMPLETED)
        assert indexed(world) == (set(), set())
        assert set(all_rows(world)) == set(rows)
        assert searchable_hits(world, list(rows)) == set()

    def test_enable_brings_it_back_without_embedding(self) -> None:
        world = completed_world()
        world.run(DocumentDisabled(**IDS))
        embedded = len(world.embedder.embedded_texts)
        assert world.run(DocumentEnabled(**IDS)) == []
        assert world.doc().status is S.COMPLETED and world.doc().enabled
        assert indexed(world) == (set(all_rows(world)), set(all_rows(world)))
        assert len(world.embedder.embedded_texts) == embedded

    def test_search_drops_a_disabled_document_before_the_indexes_follow(self) -> None:
        world = completed_world()
        ids = list(all_rows(world))
        # only parse has run: the rows already answer no search
        world.run(DocumentDisabled(**IDS), skip=["split"])
        assert searchable_hits(world, ids) == set()
        assert indexed(world) == (set(ids), set(ids))

    def test_a_stale_disable_is_dropped(self) -> None:
        world = completed_world()
        world.run(updated(text_of(*P[:2]), 2))
        world.run(DocumentDisabled(**IDS, version=1))
        doc = world.doc()
        assert doc.enabled and doc.last_dropped and "document.disabled v1" in doc.last_dropped
        assert world.consistent() and world.segments()

    def test_redelivered_switches_change_nothing(self) -> None:
        world = completed_world()
        off = DocumentDisabled(**IDS)
        on = DocumentEnabled(**IDS)
        world.run(off, off, on, on, off)
        assert not world.doc().enabled and world.doc().status is S.COMPLETED
        assert indexed(world) == (set(), set())

    def test_a_disabled_document_stays_out_through_an_update(self) -> None:
        world = completed_world()
        world.run(DocumentDisabled(**IDS))
        assert world.run(updated(text_of(P[0], paragraph(9)), 2)) == []
        assert world.doc().status is S.COMPLETED and world.doc().version == 2
        assert indexed(world) == (set(), set())
        world.run(DocumentEnabled(**IDS))
        assert world.consistent() and len(world.segments()) == 2

    def test_archive_refuses_updates_and_segment_operations_until_unarchived(self) -> None:
        world = completed_world()
        assert world.run(DocumentArchived(**IDS)) == []
        assert indexed(world) == (set(), set())
        world.run(updated(text_of(paragraph(8)), 2))
        doc = world.doc()
        assert doc.version == 1 and doc.archived
        assert doc.last_dropped and "archived" in doc.last_dropped
        world.run(imported("job-a", "one more segment", version=1))
        job = world.job("job-a")
        assert job is not None and job["status"] == "error" and "archived" in job["error"]
        world.run(DocumentUnarchived(**IDS))
        assert world.consistent() and world.doc().status is S.COMPLETED
        world.run(updated(text_of(paragraph(8)), 2))
        assert world.doc().version == 2 and world.consistent()


class TestSegmentSwitches:
    def test_segment_disable_and_enable_by_either_id(self) -> None:
        world = completed_world()
        rows = all_rows(world)
        first = min(rows.values(), key=lambda s: s.position)
        with world.uow(readonly=True) as uow:
            seg = uow.segments.find(KEY, first.index_node_id, None)
        assert seg is not None
        world.run(SegmentDisabled(**IDS, index_node_id=first.index_node_id))
        vectors, texts = indexed(world)
        assert first.index_node_id not in vectors | texts
        assert vectors == texts == set(rows) - {first.index_node_id}
        assert world.doc().status is S.COMPLETED
        with world.uow(readonly=True) as uow:
            row = uow.segments.find(KEY, first.index_node_id, None)
        assert row is not None and not row.enabled
        embedded = len(world.embedder.embedded_texts)
        segment_id = self._segment_id(world, first.index_node_id)
        world.run(SegmentEnabled(**IDS, segment_id=segment_id))
        assert indexed(world) == (set(rows), set(rows))
        assert world.doc().status is S.COMPLETED
        assert len(world.embedder.embedded_texts) == embedded

    def test_a_disabled_segment_stays_disabled_when_its_text_is_kept(self) -> None:
        world = completed_world()
        first = world.ids_by_text()["p0w0"]
        world.run(SegmentDisabled(**IDS, index_node_id=first))
        world.run(updated(text_of(*P, paragraph(7)), 2))
        assert world.doc().status is S.COMPLETED
        vectors, texts = indexed(world)
        assert first not in vectors | texts and first in all_rows(world)
        assert len(vectors) == len(texts) == len(P)

    @staticmethod
    def _segment_id(world: World, index_node_id: str) -> int:
        state = world.uow.state.segments
        return state[index_node_id].id


class TestSegmentUpdated:
    def test_only_the_edited_segment_is_embedded_and_both_indexes_follow(self) -> None:
        world = completed_world()
        old = world.ids_by_text()["p1w0"]
        embedded = len(world.embedder.embedded_texts)
        event = SegmentUpdated(**IDS, index_node_id=old, content="edited text of one segment")
        assert world.run(event) == []
        assert world.embedder.embedded_texts[embedded:] == ["edited text of one segment"]
        doc = world.doc()
        assert doc.status is S.COMPLETED and world.consistent()
        by_text = world.ids_by_text()
        assert old not in all_rows(world) and "edited" in by_text and "p1w0" not in by_text
        new = world.segments()[by_text["edited"]]
        assert new.position == 1
        # a redelivery (the old id is gone) and a repeat by segment_id change nothing
        segment_id = world.uow.state.segments[new.index_node_id].id
        again = SegmentUpdated(**IDS, segment_id=segment_id, content="edited text of one segment")
        assert world.run(event, again) == []
        assert world.ids_by_text() == by_text and world.consistent()
        assert len(world.embedder.embedded_texts) == embedded + 1

    def test_too_long_a_text_is_rejected(self) -> None:
        world = completed_world()
        old = world.ids_by_text()["p1w0"]
        long = " ".join(["w"] * 100)  # the double's limit is 64 tokens
        (rejection,) = world.run(SegmentUpdated(**IDS, index_node_id=old, content=long))
        assert "100 tokens" in str(rejection.error)
        assert old in world.segments()


class TestDatasetDeleted:
    def test_every_document_goes_with_its_segments_vectors_and_texts(self) -> None:
        world = World()
        other = DocKey(TENANT, "other", "keep")
        events: list[Event] = [created(text_of(*P), 1), created(text_of(P[0]), 1, doc="b")]
        world.run(*events)
        world.run(
            created(text_of(P[1]), 1).model_copy(
                update={"dataset_id": "other", "document_id": "keep"}
            )
        )
        gone = DatasetDeleted(tenant_id=TENANT, dataset_id=DATASET)
        assert world.run(gone, gone) == []
        for doc_id in (DOC, "b"):
            key = DocKey(TENANT, DATASET, doc_id)
            assert world.doc(key).deleted
            assert all_rows(world, key) == {} and indexed(world, key) == (set(), set())
        assert world.consistent(other) and world.segments(other)
        # later, the same document id is a new version of a live document again
        world.run(created(text_of(P[2]), None))
        assert world.doc().status is S.COMPLETED and world.consistent()
