"""track_status, over in-memory ports: a document completes only when every
segment is flagged by both branches and both indexes hold exactly its
segments; completion also completes its import jobs."""

from __future__ import annotations

from domain.documents import IndexingStatus
from domain.events import SegmentsLoaded
from domain.ports import KeywordRow, VectorRow
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


def indexed_world(*paragraphs: str) -> World:
    """Both branches done, track_status not run yet."""
    world = World()
    world.run(created(text_of(*paragraphs), 1), skip=("track_status",))
    assert world.doc().status is S.INDEXING and world.consistent()
    return world


def progress(version: int = 1, doc: str = DOC) -> SegmentsLoaded:
    return SegmentsLoaded(
        tenant_id=TENANT, dataset_id=DATASET, document_id=doc, version=version, index_node_ids=[]
    )


def track(world: World, *events: SegmentsLoaded) -> None:
    result = world.stage("track_status").handle(list(events) or [progress()])
    assert result.emits == [] and result.rejected == []


class TestCompletion:
    def test_completes_when_flags_and_both_stores_agree(self) -> None:
        world = indexed_world(*P[:2])
        track(world)
        doc = world.doc()
        assert doc.status is S.COMPLETED and doc.completed_at is not None

    def test_duplicates_are_harmless(self) -> None:
        world = indexed_world(*P[:2])
        track(world, progress(), progress())
        track(world)
        assert world.doc().status is S.COMPLETED

    def test_completes_the_documents_import_jobs(self) -> None:
        world = World()
        world.run(created(text_of(*P[:2]), 1))
        assert world.doc().status is S.COMPLETED
        world.run(imported("job-1", "imported text"), skip=("track_status",))
        assert world.job("job-1")["status"] == "processing"  # type: ignore[index]
        track(world)
        assert world.doc().status is S.COMPLETED
        job = world.job("job-1")
        assert job is not None and (job["status"], job["completed"]) == ("completed", 1)


class TestNotYet:
    def test_not_while_a_segment_is_unflagged(self) -> None:
        world = indexed_world(*P[:2])
        with world.uow() as uow:
            uow.segments.mark("keywords_indexed", [world.ids_by_text()["p0w0"]], False)
            uow.commit()
        track(world)
        assert world.doc().status is S.INDEXING

    def test_not_while_the_vector_index_holds_a_removed_segment(self) -> None:
        world = indexed_world(*P[:2])
        world.vectors.upsert([VectorRow("removed-but-still-there", [0.0] * 16, KEY)])
        track(world)
        assert world.doc().status is S.INDEXING

    def test_not_while_the_vector_index_misses_a_segment(self) -> None:
        world = indexed_world(*P[:2])
        world.vectors.delete([world.ids_by_text()["p0w0"]])
        track(world)
        assert world.doc().status is S.INDEXING

    def test_not_while_the_keyword_index_holds_a_removed_segment(self) -> None:
        world = indexed_world(*P[:2])
        world.keyword_index.upsert([KeywordRow("removed-but-still-there", KEY, "word")])
        track(world)
        assert world.doc().status is S.INDEXING

    def test_not_while_the_keyword_index_misses_a_segment(self) -> None:
        world = indexed_world(*P[:2])
        world.keyword_index.delete([world.ids_by_text()["p0w0"]])
        track(world)
        assert world.doc().status is S.INDEXING

    def test_a_newer_version_is_not_completed_by_the_older_ones_state(self) -> None:
        world = indexed_world(*P[:2])
        # v2 is being parsed: its status is not indexing, nothing may complete it
        world.parsed(updated(text_of(*P[:3]), 2))
        track(world, progress(1))
        doc = world.doc()
        assert (doc.version, doc.status) == (2, S.SPLITTING)

    def test_other_statuses_are_left_alone(self) -> None:
        world = World()
        world.run(created(text_of(*P[:2]), 1))
        with world.uow() as uow:
            doc = uow.documents.get(KEY, for_update=True)
            assert doc is not None and doc.fail(1, "broken")
            uow.documents.save(doc)
            uow.commit()
        track(world)
        assert world.doc().status is S.ERROR


def test_unknown_documents_and_reads_only_when_nothing_completes() -> None:
    world = indexed_world(*P[:2])
    world.vectors.upsert([VectorRow("extra", [0.0] * 16, KEY)])
    commits = world.uow.commits
    track(world, progress(doc="unknown"), progress())
    assert world.uow.commits == commits  # nothing to complete: no write
