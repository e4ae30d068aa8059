"""parse, over in-memory ports: claiming versions, resolving missing ones,
tombstones, rejection of broken documents, uploaded bytes, the claim-check
for large text, and output order."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from consumers.failures import FailureRecorder
from consumers.parse import ParseStage
from domain.claim_check import parsed_key, upload_key, upload_uri
from domain.documents import DocKey, IndexingStatus
from domain.errors import DocumentError, UnparseableDocument
from domain.events import (
    DocumentCreated,
    DocumentDeleted,
    DocumentParsed,
    DocumentUpdated,
    ImportedSegment,
    SegmentDeleted,
    SegmentsBatchImported,
    Topic,
)
from tests.fakes import InMemoryDocumentReader, InMemoryUnitOfWorkFactory
from tests.unit.stage_support import (
    DATASET,
    DOC,
    KEY,
    RULE,
    TENANT,
    World,
    created,
    deleted,
    of_type,
    paragraph,
    text_of,
    updated,
)

S = IndexingStatus


def parse_stage(world: World, inline_text_bytes: int = 1024) -> ParseStage:
    return ParseStage(world.uow, world.reader, inline_text_bytes)


def by_uri(uri: str, version: int, doc: str = DOC) -> DocumentCreated:
    return DocumentCreated(
        tenant_id=TENANT, dataset_id=DATASET, document_id=doc, version=version, source="f", uri=uri
    )


def set_embedded_texts(world: World, n: int) -> None:
    """As if the embed stage had counted ``n`` texts for the document."""
    with world.uow() as uow:
        doc = uow.documents.get(KEY, for_update=True)
        assert doc is not None
        doc.embedded_texts = n
        uow.documents.save(doc)
        uow.commit()


class TestCreateAndUpdate:
    def test_created_is_claimed_parsed_and_sent_on_inline(self) -> None:
        world = World()
        result = parse_stage(world).handle([created("hello world", 5, content_hash="h")])
        (parsed,) = of_type(result, DocumentParsed)
        assert [e.topic for e in result.emits] == [Topic.PARSED]
        assert (parsed.version, parsed.text, parsed.text_ref, parsed.chars) == (
            5,
            "hello world",
            None,
            11,
        )
        assert (parsed.cleanup, parsed.mime_type) == ("incremental", "text/plain")
        doc = world.doc()
        assert (doc.version, doc.status, doc.chars, doc.content_hash) == (5, S.SPLITTING, 11, "h")
        assert doc.source == "doc.txt" and doc.pk is not None
        assert result.rejected == []

    def test_update_carries_its_cleanup_and_resets_work_counters(self) -> None:
        world = World()
        parse_stage(world).handle([created("one", 1)])
        set_embedded_texts(world, 7)
        result = parse_stage(world).handle([updated("two", 2, cleanup="none")])
        (parsed,) = of_type(result, DocumentParsed)
        assert (parsed.version, parsed.text, parsed.cleanup) == (2, "two", "none")
        assert (world.doc().version, world.doc().embedded_texts) == (2, 0)

    def test_large_text_goes_by_claim_check_and_replaces_the_older_version(self) -> None:
        world = World()
        stage = parse_stage(world, inline_text_bytes=10)
        first = of_type(stage.handle([created("x" * 11, 1)]), DocumentParsed)[0]
        assert first.text is None and first.text_ref == parsed_key(KEY, 1)
        assert world.payload(first.text_ref) == b"x" * 11
        second = of_type(stage.handle([updated("y" * 20, 2)]), DocumentParsed)[0]
        assert second.text_ref is not None and world.payload(second.text_ref) == b"y" * 20
        assert world.payload(first.text_ref) is None  # one version's text at a time
        # at the limit it still travels inline
        third = of_type(stage.handle([updated("z" * 10, 3)]), DocumentParsed)[0]
        assert (third.text, third.text_ref) == ("z" * 10, None)

    def test_documents_are_independent(self) -> None:
        world = World()
        result = parse_stage(world).handle([created("a", 1, doc="a"), created("b", 1, doc="b")])
        assert [e.document_id for e in of_type(result, DocumentParsed)] == ["a", "b"]


class TestStale:
    def test_older_version_is_dropped_and_recorded(self) -> None:
        world = World()
        stage = parse_stage(world)
        stage.handle([created("new", 2)])
        result = stage.handle([updated("old", 1)])
        assert result.emits == [] and result.rejected == []
        doc = world.doc()
        assert (doc.version, doc.status) == (2, S.SPLITTING)
        assert (
            doc.last_dropped is not None and "v1" in doc.last_dropped and "v2" in doc.last_dropped
        )

    def test_two_versions_in_one_batch_send_only_the_newer(self) -> None:
        world = World()
        result = parse_stage(world).handle([created("v1", 1), updated("v2", 2)])
        assert [(e.version, e.text) for e in of_type(result, DocumentParsed)] == [(2, "v2")]
        doc = world.doc()
        assert (doc.version, doc.status) == (2, S.SPLITTING)
        assert doc.last_dropped is not None and "v1" in doc.last_dropped

    def test_redelivery_claims_the_same_version_again(self) -> None:
        world = World()
        stage = parse_stage(world, inline_text_bytes=4)
        first = stage.handle([created("hello world", 3)])
        again = stage.handle([created("hello world", 3)])
        fields = {"event_id", "occurred_at"}
        (a,), (b,) = of_type(first, DocumentParsed), of_type(again, DocumentParsed)
        assert a.text_ref is not None
        assert a.model_dump(exclude=fields) == b.model_dump(exclude=fields)
        assert world.payload(a.text_ref) == b"hello world"
        assert world.doc().status is S.SPLITTING
        with world.uow(readonly=True) as uow:
            assert uow.documents.list(TENANT, DATASET) == [world.doc()]


class TestDelete:
    def test_delete_tombstones_and_is_sent_on(self) -> None:
        world = World()
        stage = parse_stage(world)
        stage.handle([created("a", 1)])
        event = deleted(2)
        result = stage.handle([event])
        assert [(e.topic, e.event) for e in result.emits] == [(Topic.PARSED, event)]
        assert (world.doc().status, world.doc().version) == (S.DELETED, 2)

    def test_delete_of_an_unknown_document_leaves_a_tombstone(self) -> None:
        world = World()
        stage = parse_stage(world)
        assert len(stage.handle([deleted(4)]).emits) == 1
        assert (world.doc().status, world.doc().version) == (S.DELETED, 4)
        # the create it overtook is stale now
        assert stage.handle([created("late", 4)]).emits == []
        assert stage.handle([created("late", 3)]).emits == []
        assert world.doc().status is S.DELETED
        # a newer version brings the document back
        assert len(stage.handle([created("again", 5)]).emits) == 1
        assert world.doc().status is S.SPLITTING

    def test_stale_delete_is_dropped(self) -> None:
        world = World()
        stage = parse_stage(world)
        stage.handle([created("a", 5)])
        assert stage.handle([deleted(4)]).emits == []
        doc = world.doc()
        assert (doc.status, doc.version) == (S.SPLITTING, 5)
        assert doc.last_dropped is not None and "document.deleted v4" in doc.last_dropped


class TestRejection:
    def test_broken_document_is_rejected_and_the_rest_of_the_batch_goes_on(self) -> None:
        world = World()
        world.reader.files["file:///broken.pdf"] = UnparseableDocument("the PDF is encrypted")
        broken = by_uri("file:///broken.pdf", 1, doc="broken")
        result = parse_stage(world).handle([broken, created("fine", 1)])
        assert [e.document_id for e in of_type(result, DocumentParsed)] == [DOC]
        (rejection,) = result.rejected
        assert rejection.event is broken and isinstance(rejection.error, DocumentError)
        broken_key = broken.doc_key
        assert world.doc(broken_key).status is S.PARSING  # the runtime records the failure
        assert FailureRecorder(world.uow)("parse", rejection.event, rejection.error)
        doc = world.doc(broken_key)
        assert (doc.status, doc.error) == (S.ERROR, "the PDF is encrypted")

    def test_empty_inline_content_is_rejected(self) -> None:
        world = World()
        result = parse_stage(world).handle([created("   ", 1)])
        assert result.emits == [] and len(result.rejected) == 1

    def test_a_file_reference_is_read(self) -> None:
        world = World()
        world.reader.files["file:///a.txt"] = "text of a"
        (parsed,) = of_type(parse_stage(world).handle([by_uri("file:///a.txt", 1)]), DocumentParsed)
        assert parsed.text == "text of a"
        # what `verify --repair` may read again: the reference, never the source
        assert (world.doc().uri, world.doc().inline_content) == ("file:///a.txt", False)
        parse_stage(world).handle([created("inline text", 2)])
        assert (world.doc().uri, world.doc().inline_content) == (None, True)


class TestForwarding:
    def test_batch_import_creates_its_job_and_is_sent_on(self) -> None:
        world = World()
        event = SegmentsBatchImported(
            tenant_id=TENANT,
            dataset_id=DATASET,
            document_id=DOC,
            version=2,
            job_id="job-1",
            segments=[ImportedSegment(content="a"), ImportedSegment(content="b")],
        )
        stage = parse_stage(world)
        assert [e.event for e in stage.handle([event]).emits] == [event]
        assert [e.event for e in stage.handle([event]).emits] == [event]  # redelivered
        job = world.job("job-1")
        assert job is not None and (job["status"], job["total"], job["completed"]) == (
            "waiting",
            2,
            0,
        )

    def test_output_keeps_the_input_order(self) -> None:
        world = World()
        seg_deleted = SegmentDeleted(
            tenant_id=TENANT, dataset_id=DATASET, document_id=DOC, index_node_id="x", version=9
        )
        gone = deleted(1, doc="other")
        result = parse_stage(world).handle([created(paragraph(0), 1), seg_deleted, gone])
        assert [type(e.event) for e in result.emits] == [
            DocumentParsed,
            SegmentDeleted,
            DocumentDeleted,
        ]
        assert all(e.topic is Topic.PARSED for e in result.emits)


class TestUnitsOfWork:
    def test_extraction_runs_outside_any_transaction_between_two_writes(self) -> None:
        uow = InMemoryUnitOfWorkFactory()
        reader = InMemoryDocumentReader()
        seen: list[int] = []
        reader.on_read = lambda: seen.append(uow.open_units)
        world = World(uow=uow, reader=reader)
        parse_stage(world).handle([created("a", 1), created("b", 1, doc="b")])
        assert seen == [0, 0]
        assert uow.commits == 2  # the claims, then the results


# -- events without a version ---------------------------------------------------


def unversioned(kind: type[Any], doc: str = DOC, **fields: Any) -> Any:
    """A lifecycle event as an upstream system may publish it: no version."""
    if kind in (DocumentCreated, DocumentUpdated):
        fields = {"source": f"{doc}.txt", "process_rule": RULE, **fields}
    return kind(tenant_id=TENANT, dataset_id=DATASET, document_id=doc, **fields)


class TestMissingVersions:
    def test_a_new_document_starts_at_version_1(self) -> None:
        world = World()
        parsed = world.parsed(unversioned(DocumentCreated, content="a"))
        assert parsed.version == 1 and world.doc().version == 1

    def test_an_update_without_version_after_v3_gets_v4(self) -> None:
        world = World()
        stage = parse_stage(world)
        stage.handle([created("three", 3)])
        (parsed,) = of_type(
            stage.handle([unversioned(DocumentUpdated, content="four")]), DocumentParsed
        )
        assert (parsed.version, parsed.text) == (4, "four")
        assert (world.doc().version, world.doc().status) == (4, S.SPLITTING)

    def test_v3_then_a_delete_without_version_then_v4_completes_at_v4(self) -> None:
        """The upstream sequence that used to leave the document deleted: the
        versionless delete took a timestamp, above every small version."""
        world = World()
        assert world.run(created(paragraph(0), 3)) == []
        assert (world.doc().version, world.doc().status) == (3, S.COMPLETED)
        assert world.run(unversioned(DocumentDeleted)) == []
        assert (world.doc().version, world.doc().status) == (3, S.DELETED)
        assert world.segments() == {}
        assert world.run(created(text_of(paragraph(1), paragraph(2)), 4)) == []
        doc = world.doc()
        assert (doc.version, doc.status, doc.segment_count) == (4, S.COMPLETED, 2)
        assert world.consistent() and len(world.vectors.ids_for_document(KEY)) == 2

    def test_a_copy_of_a_versionless_create_in_a_later_batch_is_the_same_version(self) -> None:
        """A producer's retry or a redelivery: the same event_id, so the same
        version; the work counters of the first copy survive."""
        world = World()
        stage = parse_stage(world)
        event = unversioned(DocumentCreated, content="a")
        (first,) = of_type(stage.handle([event]), DocumentParsed)
        set_embedded_texts(world, 3)
        (again,) = of_type(stage.handle([event]), DocumentParsed)
        assert first.version == again.version == 1
        assert (world.doc().version, world.doc().embedded_texts) == (1, 3)
        other = unversioned(DocumentCreated, content="a")  # a new event: a new version
        (newer,) = of_type(stage.handle([other]), DocumentParsed)
        assert newer.version == 2

    def test_a_redelivered_delete_without_version_stays_at_its_version(self) -> None:
        world = World()
        stage = parse_stage(world)
        stage.handle([created("a", 2)])
        event = unversioned(DocumentDeleted)
        first, again = stage.handle([event]), stage.handle([event])
        assert [e.event.version for e in first.emits + again.emits] == [2, 2]
        assert (world.doc().version, world.doc().status) == (2, S.DELETED)
        assert again.counts == {}

    def test_segment_deletes_and_imports_apply_to_the_current_version(self) -> None:
        world = World()
        stage = parse_stage(world)
        stage.handle([created("a", 3)])
        seg = unversioned(SegmentDeleted, index_node_id="x")
        job = unversioned(
            SegmentsBatchImported, job_id="j", segments=[ImportedSegment(content="q")]
        )
        ghost = unversioned(SegmentDeleted, doc="ghost", index_node_id="y")
        result = stage.handle([seg, job, ghost])
        assert [(type(e.event), e.event.version) for e in result.emits] == [
            (SegmentDeleted, 3),
            (SegmentsBatchImported, 3),
            (SegmentDeleted, 0),  # unknown document: split drops it
        ]
        assert world.doc().version == 3  # neither made a new version
        with world.uow(readonly=True) as uow:
            assert uow.documents.get(DocKey(TENANT, DATASET, "ghost")) is None

    def test_versionless_events_run_through_the_pipeline(self) -> None:
        world = World()
        first = unversioned(DocumentCreated, content=text_of(paragraph(0), paragraph(1)))
        assert world.run(first) == []
        second = unversioned(DocumentUpdated, content=text_of(paragraph(0), paragraph(9)))
        assert world.run(second) == []
        doc = world.doc()
        assert (doc.version, doc.status, doc.segment_count) == (2, S.COMPLETED, 2)
        assert (doc.segments_added, doc.segments_kept, doc.segments_removed) == (1, 1, 1)
        assert world.consistent()

    def test_a_rejected_event_carries_the_version_it_was_claimed_at(self) -> None:
        world = World()
        stage = parse_stage(world)
        stage.handle([created("a", 2)])
        world.reader.files["file:///broken.pdf"] = UnparseableDocument("the PDF is encrypted")
        result = stage.handle([unversioned(DocumentUpdated, uri="file:///broken.pdf")])
        (rejection,) = result.rejected
        assert rejection.event.version == 3
        assert FailureRecorder(world.uow)("parse", rejection.event, rejection.error)
        doc = world.doc()
        assert (doc.version, doc.status, doc.error) == (3, S.ERROR, "the PDF is encrypted")

    def test_a_versionless_event_given_up_by_the_runtime_fails_the_current_version(self) -> None:
        world = World()
        parse_stage(world).handle([unversioned(DocumentCreated, content="a")])
        failed = unversioned(DocumentUpdated, content="b")  # as it sits on the topic
        assert FailureRecorder(world.uow)("parse", failed, RuntimeError("database down"))
        assert (world.doc().version, world.doc().status) == (1, S.ERROR)


class TestStaleEventsAreVisible:
    def test_a_stale_event_is_counted_logged_and_recorded(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        world = World()
        stage = parse_stage(world)
        assert stage.handle([created("new", 5)]).counts == {}
        with caplog.at_level(logging.INFO, logger="consumers.parse"):
            result = stage.handle([updated("old", 4), deleted(3)])
        assert result.emits == [] and result.counts == {"stale_dropped": 2}
        reason = "document.deleted v3 dropped: document is at v5 (splitting)"
        assert world.doc().last_dropped == reason
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("document.updated v4 dropped" in m for m in warned), warned
        assert any(reason in m for m in warned), warned

    def test_a_version_superseded_during_extraction_is_counted(self) -> None:
        world = World()
        stage = parse_stage(world)

        def newer_version_arrives() -> None:
            world.reader.on_read = None
            parse_stage(world).handle([created("newer", 7)])

        world.reader.on_read = newer_version_arrives
        result = stage.handle([created("older", 6)])
        assert result.emits == [] and result.counts == {"stale_dropped": 1}
        assert world.doc().version == 7
        assert world.doc().last_dropped == (
            "document.created v6 dropped: document is at v7 (splitting)"
        )


# -- uploaded bytes ---------------------------------------------------------------


def upload(world: World, data: bytes, key: DocKey = KEY, content_hash: str = "h1") -> str:
    payload_key = upload_key(key, content_hash)
    with world.uow() as uow:
        uow.payloads.put(payload_key, data)
        uow.commit()
    return upload_uri(payload_key)


def by_upload(uri: str, version: int | None = 1, source: str = "/home/ann/notes.md") -> Any:
    return DocumentCreated(
        tenant_id=TENANT,
        dataset_id=DATASET,
        document_id=DOC,
        version=version,
        source=source,
        uri=uri,
        content_hash="h1",
    )


class TestUploads:
    def test_uploaded_bytes_are_read_from_the_database_and_extracted(self) -> None:
        world = World()
        uri = upload(world, b"# Notes\n\nuploaded text")
        assert uri == f"kbstream-upload:{upload_key(KEY, 'h1')}"
        parsed = world.parsed(by_upload(uri))
        assert parsed.text == "# Notes\n\nuploaded text"
        # the file name (for its extension) comes from the source, never the disk
        assert world.reader.reads == ["bytes:notes.md"]

    def test_a_missing_upload_is_rejected_with_what_to_do(self) -> None:
        world = World()
        uri = upload_uri(upload_key(KEY, "gone"))
        result = parse_stage(world).handle([by_upload(uri)])
        (rejection,) = result.rejected
        assert isinstance(rejection.error, DocumentError)
        assert rejection.error.reason == (
            "the uploaded content of /home/ann/notes.md is no longer in the database; "
            "index the file again"
        )
        assert world.reader.reads == []

    @pytest.mark.parametrize(
        "payload_key",
        [
            upload_key(DocKey(TENANT, DATASET, "other"), "h1"),  # another document's
            upload_key(DocKey("other", DATASET, DOC), "h1"),  # another tenant's
            parsed_key(KEY, 1),  # not an upload at all
            upload_key(KEY, ""),
            upload_key(KEY, "h1/x"),
        ],
    )
    def test_an_event_may_only_name_its_own_documents_upload(self, payload_key: str) -> None:
        world = World()
        with world.uow() as uow:
            uow.payloads.put(payload_key, b"someone else's text")
            uow.commit()
        result = parse_stage(world).handle([by_upload(f"kbstream-upload:{payload_key}")])
        assert result.emits == [] and len(result.rejected) == 1
        assert "is not an upload of document" in str(result.rejected[0].error)
        assert world.reader.reads == []

    def test_uploads_are_read_in_a_read_only_unit_before_extraction(self) -> None:
        uow = InMemoryUnitOfWorkFactory()
        reader = InMemoryDocumentReader()
        world = World(uow=uow, reader=reader)
        uri = upload(world, b"uploaded")
        seen: list[tuple[int, int]] = []
        reader.on_read = lambda: seen.append((uow.open_units, uow.readonly_opened))
        before = uow.commits
        parse_stage(world).handle([by_upload(uri)])
        assert seen == [(0, 1)]  # the bytes came from one read-only unit, now closed
        assert uow.commits - before == 2  # the claim, then the result

    def test_an_upload_without_version_is_claimed_as_the_next_version(self) -> None:
        world = World()
        parse_stage(world).handle([created("one", 1)])
        parsed = world.parsed(by_upload(upload(world, b"two"), version=None))
        assert (parsed.version, parsed.text) == (2, "two")

    def test_a_delete_purges_the_documents_uploads_only(self) -> None:
        world = World()
        other = DocKey(TENANT, DATASET, "other")
        mine, theirs = upload(world, b"mine"), upload(world, b"theirs", key=other)
        assert world.run(by_upload(mine)) == []
        assert world.doc().status is S.COMPLETED
        assert world.run(unversioned(DocumentDeleted)) == []
        assert world.payload(mine.removeprefix("kbstream-upload:")) is None
        assert world.payload(theirs.removeprefix("kbstream-upload:")) == b"theirs"
