"""Internal topics are not trusted across documents (issue 20, items 2 and 3):
a stage derives every claim-check key from the event's own document and
version, refuses an event naming another document's segment ids, and ids
containing '/' never share claim-check keys."""

from __future__ import annotations

from pathlib import Path

from consumers.contract import Emit, StageConfig, StageResult
from domain.claim_check import parsed_key, removals_key, upload_key
from domain.documents import DocKey, IndexingStatus
from domain.errors import DocumentError
from domain.events import (
    DocumentParsed,
    EmbeddedRef,
    Event,
    SegmentDeleted,
    SegmentPayload,
    SegmentsEmbedded,
    SegmentsRemoved,
    SegmentsSplit,
    Topic,
)
from domain.segments import compute_doc_hash
from producers.uploads import upload_files
from tests.unit.stage_support import (
    DATASET,
    KEY,
    RULE,
    World,
    created,
    deleted,
    paragraph,
    text_of,
)

S = IndexingStatus
EVIL = "mallory"
ATTACKER = DocKey(EVIL, DATASET, "mine")
VICTIM_TEXT = text_of(paragraph(0, "secret"), paragraph(1, "secret"))


def as_attacker(event: Event) -> Event:
    return event.model_copy(update={"tenant_id": EVIL, "document_id": ATTACKER.document_id})


def two_tenants(**kw: object) -> World:
    """The victim (KEY) and the attacker's own document, both completed."""
    world = World(**kw)  # type: ignore[arg-type]
    assert world.run(created(VICTIM_TEXT, 1)) == []
    assert world.run(as_attacker(created(paragraph(7, "mine"), 1))) == []
    for key in (KEY, ATTACKER):
        assert world.doc(key).status is S.COMPLETED and world.consistent(key)
    return world


def snapshot(world: World, key: DocKey) -> tuple[object, ...]:
    ids = set(world.segments(key))
    return (
        {i: s.content for i, s in world.segments(key).items()},
        {i: world.vectors.rows[i] for i in ids},
        {i: world.keyword_index.rows[i] for i in ids},
    )


def publish(world: World, topic: Topic, event: Event) -> list[str]:
    """Deliver one forged event; the reasons of every rejection."""
    rejected = world.deliver(StageResult(emits=[Emit(topic, event)]))
    return [str(r.error) for r in rejected]


class TestParsedText:
    def test_a_parsed_event_naming_another_tenants_text_is_refused(self) -> None:
        world = two_tenants(stage_config=StageConfig(inline_text_bytes=10, segments_per_event=2))
        victim_ref = parsed_key(KEY, 1)
        assert world.payload(victim_ref) == VICTIM_TEXT.encode()
        before = snapshot(world, ATTACKER)
        forged = DocumentParsed(
            tenant_id=EVIL,
            dataset_id=DATASET,
            document_id=ATTACKER.document_id,
            version=1,
            source="mine.txt",
            process_rule=RULE,
            text_ref=victim_ref,
            chars=len(VICTIM_TEXT),
        )
        (reason,) = publish(world, Topic.PARSED, forged)
        assert f"is not the text of document {ATTACKER} version 1" in reason
        # the victim's text was never read into the attacker's dataset
        assert snapshot(world, ATTACKER) == before
        assert not any("secret" in t for t, _ in world.keyword_index.rows.values() if _ != KEY)

    def test_a_text_ref_of_another_version_is_refused(self) -> None:
        world = World(stage_config=StageConfig(inline_text_bytes=10, segments_per_event=2))
        parsed = world.parsed(created(VICTIM_TEXT, 1))
        result = world.stage("split").handle(
            [parsed.model_copy(update={"text_ref": parsed_key(KEY, 0)})]
        )
        (rejection,) = result.rejected
        assert isinstance(rejection.error, DocumentError)
        assert world.segments() == {}


class TestForeignSegmentIds:
    def forged_split(self, world: World) -> SegmentsSplit:
        victim_id = world.ids_by_text()["secret0w0"]
        return SegmentsSplit(
            tenant_id=EVIL,
            dataset_id=DATASET,
            document_id=ATTACKER.document_id,
            version=1,
            segments=[
                SegmentPayload(
                    index_node_id=victim_id,
                    doc_hash=compute_doc_hash("planted words"),
                    position=0,
                    content="planted words",
                )
            ],
        )

    def test_a_split_event_naming_another_tenants_id_moves_nothing(self) -> None:
        world = two_tenants()
        victim, attacker = snapshot(world, KEY), snapshot(world, ATTACKER)
        reasons = publish(world, Topic.SEGMENTS, self.forged_split(world))
        # refused by both branches that read the topic, with the reason
        assert len(reasons) == 2
        assert all("names 1 segment id(s) of another document" in r for r in reasons)
        assert snapshot(world, KEY) == victim and snapshot(world, ATTACKER) == attacker
        assert world.consistent(KEY) and world.embedder.embedded_texts[-1:] != ["planted words"]

    def test_an_embedded_event_naming_another_tenants_id_moves_nothing(self) -> None:
        world = two_tenants()
        victim = snapshot(world, KEY)
        mine = next(iter(world.segments(ATTACKER).values()))  # a vector in the cache
        forged = SegmentsEmbedded(
            tenant_id=EVIL,
            dataset_id=DATASET,
            document_id=ATTACKER.document_id,
            version=1,
            provider=world.embedder.provider,
            model=world.embedder.model,
            segments=[
                EmbeddedRef(index_node_id=world.ids_by_text()["secret1w0"], doc_hash=mine.doc_hash)
            ],
        )
        (reason,) = publish(world, Topic.EMBEDDED, forged)
        assert "another document" in reason
        assert snapshot(world, KEY) == victim and world.consistent(KEY)

    def test_a_removal_naming_another_tenants_id_deletes_nothing(self) -> None:
        world = two_tenants()
        victim = snapshot(world, KEY)
        forged = SegmentsRemoved(
            tenant_id=EVIL,
            dataset_id=DATASET,
            document_id=ATTACKER.document_id,
            version=1,
            index_node_ids=sorted(world.segments()),
            whole_document=True,
        )
        reasons = publish(world, Topic.SEGMENTS, forged)
        assert len(reasons) == 2 and all("another document" in r for r in reasons)
        assert snapshot(world, KEY) == victim and world.consistent(KEY)

    def test_a_segment_delete_naming_another_tenants_id_is_refused(self) -> None:
        world = two_tenants()
        victim = snapshot(world, KEY)
        forged = SegmentDeleted(
            tenant_id=EVIL,
            dataset_id=DATASET,
            document_id=ATTACKER.document_id,
            version=1,
            index_node_id=world.ids_by_text()["secret0w0"],
        )
        result = world.stage("split").handle([forged])
        (rejection,) = result.rejected
        assert "another document" in str(rejection.error) and result.emits == []
        assert snapshot(world, KEY) == victim

    def test_removals_of_the_documents_own_ids_still_work_after_their_rows_are_gone(
        self,
    ) -> None:
        world = two_tenants()
        ids = sorted(world.segments())
        assert world.run(deleted(2)) == []
        assert world.segments() == {} and world.vectors.ids_for_document(KEY) == []
        # a late copy of the removal (a redelivery) names ids no row owns any more
        late = SegmentsRemoved(
            tenant_id=KEY.tenant_id,
            dataset_id=DATASET,
            document_id=KEY.document_id,
            version=2,
            index_node_ids=ids,
            whole_document=True,
        )
        assert publish(world, Topic.SEGMENTS, late) == []
        assert world.consistent(ATTACKER)


class TestIdsWithSlashes:
    HANDBOOK = DocKey(KEY.tenant_id, DATASET, "handbook")
    ANNEX = DocKey(KEY.tenant_id, DATASET, "handbook/annex")

    def test_parsing_one_document_keeps_the_parsed_text_of_its_namesake(self) -> None:
        world = World(stage_config=StageConfig(inline_text_bytes=10, segments_per_event=2))
        annex = created(text_of(paragraph(1, "annex")), 1, doc=self.ANNEX.document_id)
        handbook = created(text_of(paragraph(2, "hand")), 1, doc=self.HANDBOOK.document_id)
        # the annex's text is stored first; the handbook's replace-by-prefix follows
        assert world.run(annex, handbook) == []
        for key in (self.HANDBOOK, self.ANNEX):
            assert world.doc(key).status is S.COMPLETED and world.consistent(key)
        assert world.payload(parsed_key(self.ANNEX, 1)) is not None

    def test_deleting_one_document_keeps_its_namesakes_uploads_and_owed_removals(
        self, tmp_path: Path
    ) -> None:
        world = World()
        f = tmp_path / "a.txt"
        f.write_text("bytes")
        done = upload_files(world.uow, [(self.HANDBOOK, f), (self.ANNEX, f)], max_bytes=100)
        with world.uow() as uow:
            uow.payloads.put(removals_key(self.ANNEX), b'["owed"]')
            uow.commit()
        assert world.run(created("text", 1, doc=self.HANDBOOK.document_id)) == []
        assert world.run(deleted(2, doc=self.HANDBOOK.document_id)) == []
        annex_upload = upload_key(self.ANNEX, done[self.ANNEX].content_hash)
        assert world.payload(annex_upload) == b"bytes"
        assert world.payload(removals_key(self.ANNEX)) == b'["owed"]'
        handbook_upload = upload_key(self.HANDBOOK, done[self.HANDBOOK].content_hash)
        assert world.payload(handbook_upload) is None
