"""split, over in-memory ports: segment sets and their diff, deletes, batch
imports, stale events, rejection, and re-deriving the output after a crash
between split's commit and its publish."""

from __future__ import annotations

import pytest

from consumers.contract import StageConfig
from domain.claim_check import parsed_key, removals_key
from domain.documents import IndexingStatus
from domain.errors import DocumentError
from domain.events import (
    DocumentParsed,
    SegmentDeleted,
    SegmentsBatchImported,
    SegmentsRemoved,
    SegmentsSplit,
)
from tests.unit.stage_support import (
    DATASET,
    DOC,
    KEY,
    TENANT,
    World,
    created,
    deleted,
    imported,
    of_type,
    paragraph,
    removed_ids,
    split_ids,
    text_of,
    updated,
)

S = IndexingStatus
P = [paragraph(i) for i in range(6)]


def completed_world(*paragraphs: str, version: int = 1, **kw: object) -> World:
    world = World(**kw)  # type: ignore[arg-type]
    assert world.run(created(text_of(*paragraphs), version)) == []
    assert world.doc().status is S.COMPLETED and world.consistent()
    return world


def segment_deleted(version: int = 10, **target: object) -> SegmentDeleted:
    return SegmentDeleted(
        tenant_id=TENANT,
        dataset_id=DATASET,
        document_id=DOC,
        version=version,
        **target,  # type: ignore[arg-type]
    )


class TestSplit:
    def test_first_split_stores_segments_and_sends_them_in_batches(self) -> None:
        world = World()
        result = world.stage("split").handle([world.parsed(created(text_of(*P[:3]), 1))])
        batches = of_type(result, SegmentsSplit)
        assert [(b.batch, b.batches, len(b.segments)) for b in batches] == [(0, 2, 2), (1, 2, 1)]
        assert removed_ids(result) == [] and result.rejected == []
        assert split_ids(result) == list(world.ids_by_text().values())
        doc = world.doc()
        assert (doc.status, doc.segment_count, doc.tokens, doc.word_count) == (
            S.INDEXING,
            3,
            30,
            30,
        )
        assert (doc.segments_added, doc.segments_kept, doc.segments_removed) == (3, 0, 0)

    def test_update_sends_only_new_segments_and_removes_vanished_ones(self) -> None:
        world = completed_world(*P[:3])
        before = world.ids_by_text()
        result = world.stage("split").handle([world.parsed(updated(text_of(P[0], P[2], P[3]), 2))])
        assert removed_ids(result) == [[before["p1w0"]]]
        assert split_ids(result) == [world.ids_by_text()["p3w0"]]
        doc = world.doc()
        assert (doc.segments_added, doc.segments_kept, doc.segments_removed) == (1, 2, 1)
        assert doc.status is S.INDEXING and doc.segment_count == 3
        assert world.deliver(result) == []
        assert world.doc().status is S.COMPLETED and world.consistent()
        assert before["p1w0"] not in world.vectors.rows

    def test_unchanged_content_completes_at_once(self) -> None:
        world = completed_world(*P[:2])
        result = world.stage("split").handle([world.parsed(updated(text_of(*P[:2]), 2))])
        assert result.emits == []
        doc = world.doc()
        assert (doc.status, doc.version, doc.segments_kept) == (S.COMPLETED, 2, 2)

    def test_cleanup_none_keeps_vanished_segments_and_forgets_the_hash(self) -> None:
        world = completed_world(*P[:3])
        event = updated(text_of(P[0], P[2]), 2, cleanup="none", content_hash="h2")
        result = world.stage("split").handle([world.parsed(event)])
        assert result.emits == []
        assert set(world.ids_by_text()) == {"p0w0", "p1w0", "p2w0"}
        doc = world.doc()
        assert (doc.status, doc.content_hash, doc.segments_removed) == (S.COMPLETED, None, 0)

    def test_large_text_is_read_from_the_claim_check_store(self) -> None:
        world = World(stage_config=StageConfig(inline_text_bytes=10, segments_per_event=8))
        parsed = world.parsed(created(text_of(*P[:2]), 1))
        assert parsed.text_ref is not None
        result = world.stage("split").handle([parsed])
        assert len(split_ids(result)) == 2


class TestStaleAndBroken:
    def test_superseded_version_is_dropped_and_recorded(self) -> None:
        world = World()
        old = world.parsed(created(text_of(*P[:2]), 1))
        world.parsed(updated(text_of(*P[2:4]), 2))
        result = world.stage("split").handle([old])
        assert result.emits == [] and result.rejected == []
        assert world.segments() == {}
        doc = world.doc()
        assert (doc.version, doc.status) == (2, S.SPLITTING)
        assert doc.last_dropped is not None and "document.parsed v1" in doc.last_dropped

    def test_vanished_claim_check_text_is_rejected_and_the_batch_goes_on(self) -> None:
        world = World(stage_config=StageConfig(inline_text_bytes=10, segments_per_event=8))
        broken = world.parsed(created(text_of(*P[:2]), 1))
        fine = world.parsed(created(text_of(*P[2:4]), 1, doc="other"))
        assert broken.text_ref is not None
        with world.uow() as uow:
            uow.payloads.delete_prefix(broken.text_ref)
            uow.commit()
        result = world.stage("split").handle([broken, fine])
        (rejection,) = result.rejected
        assert rejection.event is broken and isinstance(rejection.error, DocumentError)
        assert "no longer in the claim-check store" in rejection.error.reason
        assert {e.document_id for e in of_type(result, SegmentsSplit)} == {"other"}
        assert world.segments() == {}

    def test_text_with_nothing_to_split_is_rejected(self) -> None:
        world = World()
        event = DocumentParsed(
            tenant_id=TENANT,
            dataset_id=DATASET,
            document_id=DOC,
            version=1,
            source="a",
            text=" ",
            chars=1,
        )
        world.parsed(created("placeholder", 1))
        result = world.stage("split").handle([event])
        assert result.emits == [] and len(result.rejected) == 1
        assert world.doc().status is S.SPLITTING and world.segments() == {}

    def test_a_document_over_the_segment_cap_is_rejected_with_a_reason(self) -> None:
        """Issue 20 item 10: the cap is a document error (permanent, not retried)."""
        world = World(stage_config=StageConfig(segments_per_event=8, max_segments_per_document=3))
        big = world.parsed(created(text_of(*P[:5]), 1))
        fine = world.parsed(created(text_of(*P[:2]), 1, doc="other"))
        result = world.stage("split").handle([big, fine])
        (rejection,) = result.rejected
        assert rejection.event is big and isinstance(rejection.error, DocumentError)
        assert "would make 5 segments" in rejection.error.reason
        assert "above the limit of 3 per document" in rejection.error.reason
        assert {e.document_id for e in of_type(result, SegmentsSplit)} == {"other"}
        assert world.segments() == {}

    def test_claim_check_text_that_is_not_utf8_is_rejected(self) -> None:
        world = World(stage_config=StageConfig(inline_text_bytes=10, segments_per_event=8))
        broken = world.parsed(created(text_of(*P[:2]), 1))
        assert broken.text_ref is not None
        with world.uow() as uow:
            uow.payloads.delete_prefix(broken.text_ref)
            uow.payloads.put(broken.text_ref, b"\xff\xfe not utf-8")
            uow.commit()
        (rejection,) = world.stage("split").handle([broken]).rejected
        assert isinstance(rejection.error, DocumentError) and "not UTF-8" in rejection.error.reason


class TestDeleteDocument:
    def test_delete_removes_every_segment_the_jobs_and_the_parsed_text(self) -> None:
        config = StageConfig(inline_text_bytes=10, segments_per_event=2)
        world = completed_world(*P[:3], stage_config=config)
        ref = parsed_key(KEY, 1)
        assert world.payload(ref) is not None
        # an import still in flight when the delete arrives
        world.run(imported("job-1", "imported text"), skip=("embed", "index_keywords"))
        assert world.job("job-1")["status"] == "processing"  # type: ignore[index]
        ids = set(world.segments())

        world.stage("parse").handle([deleted(20)])
        result = world.stage("split").handle([deleted(20)])
        (removal,) = of_type(result, SegmentsRemoved)
        assert removal.whole_document and set(removal.index_node_ids) == ids
        assert world.segments() == {} and world.payload(ref) is None
        doc = world.doc()
        assert (doc.status, doc.segment_count, doc.tokens, doc.segments_removed) == (
            S.DELETED,
            0,
            0,
            4,
        )
        job = world.job("job-1")
        assert job is not None and (job["status"], job["error"]) == (
            "error",
            "the document was deleted",
        )
        assert world.deliver(result) == [] and world.consistent()
        assert world.vectors.rows == {}

    def test_delete_prunes_the_cached_vectors_only_it_used(self) -> None:
        """Issue 20 item 6: a text's cached vector goes with the tenant's last
        segment of it; an update keeps the vectors of its old texts (an update
        back to them hits the cache)."""
        world = completed_world(*P[:3])
        assert world.run(created(text_of(P[1], P[4]), 1, doc="other")) == []
        assert world.run(updated(text_of(*P[:2]), 2)) == []  # P[2] no longer used
        theirs = created(text_of(*P[:3]), 1).model_copy(update={"tenant_id": "t2"})
        assert world.run(theirs) == []

        def cached(tenant: str = TENANT) -> int:
            with world.uow(readonly=True) as uow:
                return uow.embeddings.count(tenant_id=tenant)

        assert (cached(), cached("t2")) == (4, 3)  # P[0..2] and P[4]; an update prunes nothing
        world.run(deleted(5))
        # P[1] and P[4] are still used by "other"; P[0] and the stale P[2] go once
        # no segment of the tenant uses them (P[2] already had none: see purge)
        assert cached() == 3
        world.run(deleted(5, doc="other"))
        assert cached() == 1  # only P[2]: no deleted document used it at its delete
        with world.uow() as uow:
            assert uow.embeddings.prune(TENANT) == 1
            uow.commit()
        assert (cached(), cached("t2")) == (0, 3)

    def test_redelivered_delete_still_sends_a_whole_document_removal(self) -> None:
        world = completed_world(*P[:2])
        world.stage("parse").handle([deleted(5)])
        split = world.stage("split")
        split.handle([deleted(5)])  # committed; its publish was lost
        again = split.handle([deleted(5)])
        (removal,) = of_type(again, SegmentsRemoved)
        assert removal.whole_document and removal.index_node_ids == []
        assert world.doc().segments_removed == 2  # the first delivery's count stays
        world.deliver(again)
        assert world.vectors.rows == {} and world.texts() == set()

    def test_delete_overtaken_by_a_newer_version_is_dropped(self) -> None:
        world = completed_world(*P[:2])
        world.stage("parse").handle([deleted(5)])
        world.run(created(text_of(*P[:2]), 6))
        result = world.stage("split").handle([deleted(5)])
        assert result.emits == []
        assert len(world.segments()) == 2 and world.doc().status is S.COMPLETED
        assert "document.deleted v5" in (world.doc().last_dropped or "")


class TestDeleteSegment:
    def test_by_index_node_id_and_by_segment_id(self) -> None:
        world = completed_world(*P[:3])
        ids = world.ids_by_text()
        split = world.stage("split")
        result = split.handle([segment_deleted(index_node_id=ids["p0w0"])])
        assert removed_ids(result) == [[ids["p0w0"]]]
        row_id = world.uow.state.segments[ids["p1w0"]].id
        result2 = split.handle([segment_deleted(segment_id=row_id)])
        assert removed_ids(result2) == [[ids["p1w0"]]]
        doc = world.doc()
        assert (doc.segment_count, doc.tokens, doc.word_count) == (1, 10, 10)
        world.deliver(result)
        world.deliver(result2)
        assert world.consistent() and set(world.segments()) == {ids["p2w0"]}
        assert world.doc().status is S.COMPLETED

    def test_lost_publish_is_repaired_by_redelivery(self) -> None:
        world = completed_world(*P[:2])
        target = world.ids_by_text()["p0w0"]
        split = world.stage("split")
        split.handle([segment_deleted(index_node_id=target)])  # publish lost
        again = split.handle([segment_deleted(index_node_id=target)])
        assert removed_ids(again) == [[target]]
        assert world.doc().segment_count == 1  # counted once
        world.deliver(again)
        assert world.consistent() and target not in world.vectors.rows

    def test_lost_publish_of_a_delete_by_segment_id_is_repaired_by_redelivery(self) -> None:
        """Issue 20, item 4: the redelivered event finds no row and names no
        index_node_id; the removal owed since the delete's commit is sent again."""
        world = completed_world(*P[:3])
        target = world.ids_by_text()["p1w0"]
        event = segment_deleted(segment_id=world.uow.state.segments[target].id)
        split = world.stage("split")
        split.handle([event])  # committed; SIGKILL before the publish
        # owed to the indexes: not completed while they still hold it
        assert world.doc().status is S.INDEXING and target in world.vectors.rows
        again = split.handle([event])
        assert removed_ids(again) == [[target]]
        assert world.doc().segment_count == 2  # counted once
        assert world.deliver(again) == []
        assert target not in world.vectors.rows and target not in world.texts()
        assert world.consistent() and world.doc().status is S.COMPLETED
        # completed: nothing is owed any more, a later copy sends nothing
        assert split.handle([event]).emits == []

    def test_unknown_segment_id_and_other_documents_are_no_ops(self) -> None:
        world = completed_world(*P[:2])
        split = world.stage("split")
        assert split.handle([segment_deleted(segment_id=999_999)]).emits == []
        other = SegmentDeleted(
            tenant_id=TENANT, dataset_id=DATASET, document_id="nope", segment_id=1, version=10
        )
        assert split.handle([other]).emits == []
        assert len(world.segments()) == 2 and world.doc().segment_count == 2

    def test_segment_of_a_deleted_document_is_dropped(self) -> None:
        world = completed_world(*P[:2])
        target = world.ids_by_text()["p0w0"]
        world.run(deleted(5))
        result = world.stage("split").handle([segment_deleted(index_node_id=target, version=6)])
        assert result.emits == []
        assert "segment.deleted v6" in (world.doc().last_dropped or "")


class TestImport:
    def test_import_appends_segments_and_completes_its_job(self) -> None:
        world = completed_world(*P[:2])
        world.stage("parse").handle([imported("job-1", P[0], "brand new text")])
        result = world.stage("split").handle([imported("job-1", P[0], "brand new text")])
        fresh = split_ids(result)
        assert len(fresh) == 2 and not set(fresh) & set(world.ids_by_text().values()) - set(fresh)
        positions = sorted(s.position for s in world.segments().values())
        assert positions == [0, 1, 2, 3]
        doc = world.doc()
        assert (doc.status, doc.segment_count) == (S.INDEXING, 4)
        assert world.job("job-1")["status"] == "processing"  # type: ignore[index]
        world.deliver(result)
        assert world.doc().status is S.COMPLETED and world.consistent()
        job = world.job("job-1")
        assert job is not None and (job["status"], job["completed"], job["total"]) == (
            "completed",
            2,
            2,
        )

    def test_replay_after_a_lost_publish_sends_the_unindexed_segments_again(self) -> None:
        world = completed_world(*P[:2])
        event = imported("job-1", "brand new text", "and another one")
        world.stage("parse").handle([event])
        split = world.stage("split")
        first = split.handle([event])  # publish lost
        again = split.handle([event])
        assert split_ids(again) == split_ids(first) and len(split_ids(first)) == 2
        assert world.doc().segment_count == 4  # nothing inserted twice
        assert world.job("job-1")["status"] == "processing"  # type: ignore[index]
        world.deliver(again)
        assert world.doc().status is S.COMPLETED and world.consistent()
        # once indexed, a replay is a no-op that completes the job
        assert split.handle([event]).emits == []
        assert world.job("job-1")["status"] == "completed"  # type: ignore[index]

    @pytest.mark.parametrize(
        ("event", "reason"),
        [
            (imported("job-x", "fine", doc="missing"), "does not exist"),
            (imported("job-x", " ".join(["w"] * 65)), "above the model limit of 64"),
            (imported("job-x", "fine", version=0), "changed or was deleted"),
        ],
    )
    def test_failed_imports_fail_their_job(self, event: SegmentsBatchImported, reason: str) -> None:
        world = completed_world(*P[:2])
        world.stage("parse").handle([event])
        assert world.stage("split").handle([event]).emits == []
        job = world.job("job-x")
        assert job is not None and job["status"] == "error" and reason in job["error"]
        assert len(world.segments()) == 2


class TestCrashBetweenCommitAndPublish:
    """Split commits, then dies before publishing: the redelivered event must
    produce the lost output again, or the indexes keep removed segments."""

    def test_redelivered_split_emits_the_removal_again(self) -> None:
        world = completed_world(*P[:3])
        gone = world.ids_by_text()["p1w0"]
        parsed = world.parsed(updated(text_of(P[0], P[2], P[3]), 2))
        split = world.stage("split")
        lost = split.handle([parsed])
        assert removed_ids(lost) == [[gone]]
        assert world.payload(removals_key(KEY)) is not None

        again = split.handle([parsed])  # redelivered: the diff is empty now
        assert removed_ids(again) == [[gone]]
        assert split_ids(again) == split_ids(lost)
        assert world.doc().segments_removed == 1  # counters of the first delivery stay
        assert world.deliver(again) == []
        assert world.doc().status is S.COMPLETED and world.consistent()
        assert gone not in world.vectors.rows and gone not in world.texts()

        # completed: nothing is owed any more
        assert split.handle([parsed]).emits == []
        assert world.payload(removals_key(KEY)) is None

    def test_a_newer_version_inherits_the_removals_still_owed(self) -> None:
        world = completed_world(*P[:3])
        gone = world.ids_by_text()["p1w0"]
        split = world.stage("split")
        split.handle([world.parsed(updated(text_of(P[0], P[2]), 2))])  # publish lost
        # v3 has the same text as v2: its own diff removes nothing
        result = split.handle([world.parsed(updated(text_of(P[0], P[2]), 3))])
        assert removed_ids(result) == [[gone]]
        assert world.doc().status is S.INDEXING  # not completed while a removal is owed
        world.deliver(result)
        assert world.doc().status is S.COMPLETED and world.consistent()

    def test_a_segment_that_comes_back_is_no_longer_owed(self) -> None:
        world = completed_world(*P[:3])
        split = world.stage("split")
        split.handle([world.parsed(updated(text_of(P[0], P[2]), 2))])  # publish lost
        result = split.handle([world.parsed(updated(text_of(*P[:3]), 3))])
        assert removed_ids(result) == []
        world.deliver(result)
        assert world.doc().status is S.COMPLETED and world.consistent()


def test_split_writes_once_per_batch() -> None:
    world = World()
    events = [world.parsed(created(text_of(P[i]), 1, doc=f"d{i}")) for i in range(3)]
    commits = world.uow.commits
    world.stage("split").handle(events)
    assert world.uow.commits == commits + 1
    assert {k.document_id for k in world.uow.state.documents} == {"d0", "d1", "d2"}
    assert KEY not in world.uow.state.documents
