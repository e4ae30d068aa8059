"""index_keywords, over in-memory ports: postings replaced per segment,
reconcile by id against the segments, whole-document orphans, Q&A answers
indexed with their question, redelivery harmless."""

from __future__ import annotations

from typing import Any

from consumers.contract import StageResult
from domain.events import DocForm, Event, KeywordsIndexed, SegmentsRemoved, SegmentsSplit
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


def postings(world: World) -> dict[tuple[str, str], float]:
    """(keyword, index_node_id) -> weight."""
    return {(k[2], k[3]): w for k, (_, w) in world.uow.state.postings.items()}


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
    def test_postings_are_written_and_segments_flagged(self) -> None:
        world, events = split_world(*P[:3])
        result = index(world, events)
        ids = set(world.segments())
        assert world.postings() == ids
        assert all(s.keywords_indexed for s in world.segments().values())
        assert {i for e in of_type(result, KeywordsIndexed) for i in e.index_node_ids} == ids
        p0 = world.ids_by_text()["p0w0"]
        assert postings(world)[("p0w0", p0)] == 0.1  # the double: share of the words
        with world.uow(readonly=True) as uow:
            assert uow.postings.search(TENANT, DATASET, {"p0w3": 1.0}, 5) == [(p0, 0.1)]

    def test_redelivery_replaces_instead_of_adding(self) -> None:
        world, events = split_world(*P[:2])
        index(world, events)
        before = postings(world)
        index(world, events)
        assert postings(world) == before

    def test_qa_answers_are_indexed_with_their_question(self) -> None:
        world, events = split_world(
            "Q: what colour is the sky\nA: usually blue", doc_form=DocForm.QA
        )
        index(world, events)
        (seg,) = [s for e in events if isinstance(e, SegmentsSplit) for s in e.segments]
        assert seg.answer is not None
        assert world.keywords.texts == [f"{seg.content}\n{seg.answer}"]
        assert ("blue", seg.index_node_id) in postings(world)

    def test_dead_segments_get_no_postings_and_lose_old_ones(self) -> None:
        world, events = split_world(*P[:2])
        index(world, events)
        dead = world.ids_by_text()["p1w0"]
        with world.uow() as uow:
            uow.segments.delete_one(KEY, dead, None)
            uow.commit()
        world.keywords.texts.clear()
        result = index(world, events)
        assert dead not in world.postings()
        assert P[1] not in world.keywords.texts  # no keywords extracted for it
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
        assert world.postings() == {ids["p1w0"]}
        assert [e.index_node_ids for e in of_type(result, KeywordsIndexed)] == [[]]

    def test_whole_document_removal_drops_postings_it_does_not_name(self) -> None:
        world, events = split_world(*P[:2])
        index(world, events)
        world.run(deleted(5), skip=("index_keywords",))
        assert world.postings() != set()
        index(world, [removal([], whole_document=True, version=5)])
        assert world.postings() == set()

    def test_other_documents_keep_their_postings(self) -> None:
        world, events = split_world(*P[:2])
        index(world, events)
        other = world.stage("split").handle([world.parsed(created(P[2], 1, doc="other"))])
        index(world, [e.event for e in other.emits])
        world.run(deleted(5), skip=("index_keywords",))
        index(world, [removal([], whole_document=True, version=5)])
        assert {doc for doc, _ in world.uow.state.postings.values()} == {"other"}


def test_index_writes_once_per_batch() -> None:
    world, events = split_world(*P[:3])
    commits = world.uow.commits
    index(world, events)
    assert world.uow.commits == commits + 1
