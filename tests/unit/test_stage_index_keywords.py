"""index_keywords, over in-memory ports: segment texts upserted into the
keyword index by index_node_id, reconcile by id against the segments,
whole-document orphans, Q&A answers indexed with their question, redelivery
harmless, one index write per batch."""

from __future__ import annotations

from typing import Any

from consumers.contract import StageResult
from domain.events import DocForm, Event, KeywordsIndexed, SegmentsRemoved, SegmentsSplit
from domain.ports import KeywordRow
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


def split_world(*paragraphs: str, **kw: Any) -> tuple[World, list[Event]]:
    world = World()
    parsed = world.parsed(created(text_of(*paragraphs), 1, **kw))
    split = world.stage("split").handle([parsed])
    return world, [e.event for e in split.emits]


def index(world: World, events: list[Event]) -> StageResult:
    return world.stage("index_keywords").handle(events)


def removal(ids: list[str], whole_document: bool = False, version: int = 1) -> SegmentsRemoved:
    return SegmentsRemoved(
        tenant_id=TENANT,
        dataset_id=DATASET,
        document_id=DOC,
        version=version,
        index_node_ids=ids,
        whole_document=whole_document,
    )


class TestIndex:
    def test_texts_are_written_and_segments_flagged(self) -> None:
        world, events = split_world(*P[:3])
        result = index(world, events)
        ids = set(world.segments())
        assert world.texts() == ids
        assert all(s.keywords_indexed for s in world.segments().values())
        assert {i for e in of_type(result, KeywordsIndexed) for i in e.index_node_ids} == ids
        p0 = world.ids_by_text()["p0w0"]
        assert world.keyword_index.rows[p0] == (P[0], KEY)
        assert world.keyword_index.search("p0w3", TENANT, DATASET, 5) == [(p0, 1.0)]
        assert world.keyword_index.search("p0w3", TENANT, "other-dataset", 5) == []

    def test_redelivery_changes_nothing(self) -> None:
        world, events = split_world(*P[:2])
        index(world, events)
        before = dict(world.keyword_index.rows)
        index(world, events)
        assert world.keyword_index.rows == before

    def test_qa_answers_are_indexed_with_their_question(self) -> None:
        world, events = split_world(
            "Q: what colour is the sky\nA: usually blue", doc_form=DocForm.QA
        )
        index(world, events)
        (seg,) = [s for e in events if isinstance(e, SegmentsSplit) for s in e.segments]
        assert seg.answer is not None
        assert world.keyword_index.rows[seg.index_node_id][0] == f"{seg.content}\n{seg.answer}"
        assert world.keyword_index.search("blue", TENANT, DATASET, 5)[0][0] == seg.index_node_id

    def test_dead_segments_are_not_written_and_lose_old_entities(self) -> None:
        world, events = split_world(*P[:2])
        index(world, events)
        dead = world.ids_by_text()["p1w0"]
        with world.uow() as uow:
            uow.segments.delete_one(KEY, dead, None)
            uow.commit()
        result = index(world, events)
        assert dead not in world.texts()
        assert dead not in {i for e in of_type(result, KeywordsIndexed) for i in e.index_node_ids}


class TestRemovals:
    def test_removal_deletes_only_ids_whose_segment_is_gone(self) -> None:
        world, events = split_world(*P[:2])
        index(world, events)
        ids = world.ids_by_text()
        with world.uow() as uow:
            uow.segments.delete_one(KEY, ids["p0w0"], None)
            uow.commit()
        result = index(world, [removal([ids["p0w0"], ids["p1w0"]])])
        assert world.texts() == {ids["p1w0"]}
        assert [e.index_node_ids for e in of_type(result, KeywordsIndexed)] == [[]]

    def test_whole_document_removal_drops_entities_it_does_not_name(self) -> None:
        world, events = split_world(*P[:2])
        index(world, events)
        world.run(deleted(5), skip=("index_keywords",))
        world.keyword_index.upsert([KeywordRow("left-by-a-crash", KEY, "stray")])
        assert world.texts() != set()
        index(world, [removal([], whole_document=True, version=5)])
        assert world.texts() == set()

    def test_split_events_of_a_deleted_document_write_nothing(self) -> None:
        world, events = split_world(*P[:2])
        world.run(deleted(5), skip=("index_keywords",))
        # the split events name segments gone by now: nothing of them may stay
        index(world, [*events, removal([], whole_document=True, version=5)])
        assert world.texts() == set()

    def test_other_documents_keep_their_entities(self) -> None:
        world, events = split_world(*P[:2])
        index(world, events)
        other = world.stage("split").handle([world.parsed(created(P[2], 1, doc="other"))])
        index(world, [e.event for e in other.emits])
        world.run(deleted(5), skip=("index_keywords",))
        index(world, [removal([], whole_document=True, version=5)])
        assert {k.document_id for _, k in world.keyword_index.rows.values()} == {"other"}


def test_index_writes_once_per_batch() -> None:
    world, events = split_world(*P[:3])
    commits = world.uow.commits
    index(world, events)
    assert world.uow.commits == commits + 1
    assert world.keyword_index.upserts == 1
