"""domain.events: every event survives the wire, and anything malformed becomes
InvalidEvent (dead-letter) with a message a person can act on, never a crash."""

from __future__ import annotations

import json
import typing
from datetime import UTC, datetime
from typing import Any

import pytest

from domain.errors import InvalidEvent, PermanentError
from domain.events import (
    LIFECYCLE_TYPES,
    AnyEvent,
    DatasetDeleted,
    DocForm,
    DocumentArchived,
    DocumentCreated,
    DocumentDeleted,
    DocumentDisabled,
    DocumentEnabled,
    DocumentParsed,
    DocumentUnarchived,
    DocumentUpdated,
    EmbeddedRef,
    Event,
    ImportedSegment,
    KeywordsIndexed,
    ProcessRule,
    SegmentDeleted,
    SegmentDisabled,
    SegmentEnabled,
    SegmentPayload,
    SegmentsBatchImported,
    SegmentsEmbedded,
    SegmentsLoaded,
    SegmentsRemoved,
    SegmentsSplit,
    SegmentUpdated,
    decode_event,
    decode_lifecycle_event,
    encode_event,
    json_schemas,
)

COMMON: dict[str, Any] = {
    "tenant_id": "acme",
    "dataset_id": "ds-1",
    "document_id": "doc_42",
    "version": 7,
    "occurred_at": datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
}

SAMPLES: list[Event] = [
    DocumentCreated(
        **COMMON,
        source="handbook.md",
        content="# Title\n\n正文，含中文。",
        mime_type="text/markdown",
        content_hash="a" * 64,
        doc_form=DocForm.QA,
        process_rule=ProcessRule(mode="custom", max_tokens=128, chunk_overlap=8, separator="###"),
    ),
    DocumentUpdated(**COMMON, source="big.pdf", uri="file:///srv/docs/big.pdf"),
    DocumentDeleted(**COMMON),
    SegmentDeleted(**COMMON, index_node_id="6f1c2d0e-8b7a-4c55-9a3e-2f6d1b9c4e71"),
    SegmentDeleted(**COMMON, segment_id=12),
    SegmentsBatchImported(
        **COMMON,
        job_id="job-1",
        segments=[ImportedSegment(content="Q one", answer="A one"), ImportedSegment(content="x")],
    ),
    DocumentDisabled(**COMMON),
    DocumentEnabled(**COMMON),
    DocumentArchived(**COMMON),
    DocumentUnarchived(**COMMON),
    SegmentDisabled(**COMMON, segment_id=3),
    SegmentEnabled(**COMMON, index_node_id="6f1c2d0e-8b7a-4c55-9a3e-2f6d1b9c4e71"),
    SegmentUpdated(**COMMON, segment_id=3, content="new text", answer="new answer"),
    DatasetDeleted(**{k: v for k, v in COMMON.items() if k not in ("document_id", "version")}),
    DocumentParsed(**COMMON, source="a.txt", text="hello", chars=5),
    DocumentParsed(
        **COMMON,
        source="b.txt",
        text_ref="parsed/acme/ds-1/doc_42/7",
        chars=10_000_000,
        doc_form=DocForm.PARENT_CHILD,
    ),
    SegmentsSplit(
        **COMMON,
        segments=[
            SegmentPayload(
                index_node_id="n1", doc_hash="h1", position=0, content="c", answer="a", tokens=3
            )
        ],
        batch=1,
        batches=3,
    ),
    SegmentsRemoved(**COMMON, index_node_ids=["n1", "n2"], whole_document=True),
    SegmentsEmbedded(
        **COMMON,
        provider="sentence-transformers",
        model="all-MiniLM-L6-v2",
        segments=[EmbeddedRef(index_node_id="n1", doc_hash="h1")],
    ),
    SegmentsLoaded(**COMMON, index_node_ids=["n1"]),
    KeywordsIndexed(**COMMON, index_node_ids=[]),
]

ALL_TYPES = {
    typing.get_args(member.model_fields["type"].annotation)[0]
    for member in typing.get_args(typing.get_args(AnyEvent)[0])
}


def _wire(event: Event) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(encode_event(event))
    return obj


def _reason(raw: bytes | str | None) -> str:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(raw)
    return str(caught.value)


def _created(**overrides: Any) -> dict[str, Any]:
    obj = _wire(DocumentCreated(**COMMON, source="a.txt", content="hello"))
    obj.update(overrides)
    return {k: v for k, v in obj.items() if v is not None}


class TestRoundTrip:
    def test_samples_cover_every_event_type(self) -> None:
        assert {e.type for e in SAMPLES} == ALL_TYPES
        assert len(ALL_TYPES) == 19

    @pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.type)
    def test_encode_then_decode_gives_the_same_event(self, event: Event) -> None:
        raw = encode_event(event)
        assert isinstance(raw, bytes)
        decoded = decode_event(raw)
        assert type(decoded) is type(event)
        assert decoded == event
        # str input decodes the same as bytes
        assert decode_event(raw.decode()) == event

    def test_encoding_omits_absent_optionals_and_keys_by_document(self) -> None:
        event = DocumentUpdated(**COMMON, source="big.pdf", uri="file:///x.pdf")
        obj = _wire(event)
        assert "content" not in obj
        assert obj["type"] == "document.updated"
        assert obj["schema_version"] == 1
        assert event.key == "doc_42"

    def test_defaults_fill_envelope_fields(self) -> None:
        a = DocumentDeleted(dataset_id="d", document_id="x")
        b = DocumentDeleted(dataset_id="d", document_id="x")
        assert a.event_id != b.event_id
        assert a.tenant_id == "default"
        assert a.occurred_at.tzinfo is not None
        assert a.version is None  # resolved by parse: after the latest known version

    def test_missing_schema_version_means_current(self) -> None:
        obj = _wire(DocumentDeleted(**COMMON))
        del obj["schema_version"]
        assert decode_event(json.dumps(obj)).schema_version == 1

    def test_unicode_survives(self) -> None:
        event = DocumentCreated(**COMMON, source="文档.txt", content="问：你好吗？\n答：很好。🙂")
        assert decode_event(encode_event(event)) == event


class TestMalformed:
    def test_none_is_invalid(self) -> None:
        assert "empty" in _reason(None)

    @pytest.mark.parametrize("raw", [b"{not json", b"", "{'single': 'quotes'}", b"\xff\xfe\x00"])
    def test_malformed_json(self, raw: bytes | str) -> None:
        assert "not valid JSON" in _reason(raw)

    @pytest.mark.parametrize(
        ("raw", "kind"), [("[1, 2]", "list"), ('"text"', "str"), ("42", "int"), ("null", "None")]
    )
    def test_non_object_json(self, raw: str, kind: str) -> None:
        reason = _reason(raw)
        assert "expected a JSON object" in reason
        assert kind in reason

    def test_unknown_type(self) -> None:
        reason = _reason(json.dumps(_created(type="document.renamed")))
        assert "document.renamed" in reason

    def test_missing_type(self) -> None:
        obj = _created()
        del obj["type"]
        reason = _reason(json.dumps(obj))
        assert "type" in reason

    @pytest.mark.parametrize("version", [99, 0, 2, "1"])
    def test_unsupported_schema_version(self, version: object) -> None:
        reason = _reason(json.dumps(_created(schema_version=version)))
        assert "schema_version" in reason
        assert repr(version) in reason
        assert "[1]" in reason  # says what this consumer does read

    @pytest.mark.parametrize("version", [[1], {"major": 1}])
    def test_unhashable_schema_version_is_invalid_not_a_crash(self, version: object) -> None:
        assert "schema_version" in _reason(json.dumps(_created(schema_version=version)))

    @pytest.mark.parametrize("field", ["dataset_id", "document_id", "source"])
    def test_missing_required_field_is_named(self, field: str) -> None:
        obj = _created()
        del obj[field]
        reason = _reason(json.dumps(obj))
        assert "document.created" in reason
        assert field in reason
        assert "required" in reason.lower()

    def test_missing_required_field_of_stage_event(self) -> None:
        obj = _wire(SegmentsLoaded(**COMMON, index_node_ids=["n"]))
        del obj["index_node_ids"]
        assert "index_node_ids" in _reason(json.dumps(obj))

    def test_both_content_and_uri(self) -> None:
        reason = _reason(json.dumps(_created(uri="file:///a.txt")))
        assert "exactly one of 'content' and 'uri'" in reason

    def test_neither_content_nor_uri(self) -> None:
        obj = _created()
        del obj["content"]
        assert "exactly one of 'content' and 'uri'" in _reason(json.dumps(obj))

    def test_extra_field(self) -> None:
        reason = _reason(json.dumps(_created(colour="blue")))
        assert "colour" in reason

    def test_extra_field_in_nested_rule(self) -> None:
        obj = _created(process_rule={"mode": "custom", "chunk_size": 100})
        assert "chunk_size" in _reason(json.dumps(obj))

    def test_segment_deleted_needs_a_target(self) -> None:
        obj = _wire(SegmentDeleted(**COMMON, segment_id=1))
        del obj["segment_id"]
        assert "index_node_id or segment_id" in _reason(json.dumps(obj))

    @pytest.mark.parametrize("bad", ["", "has space", "a" * 129, "semi;colon"])
    def test_ids_are_validated(self, bad: str) -> None:
        assert "document_id" in _reason(json.dumps(_created(document_id=bad)))

    def test_wrong_field_type(self) -> None:
        assert "version" in _reason(json.dumps(_created(version="yesterday")))

    def test_negative_version(self) -> None:
        assert "version" in _reason(json.dumps(_created(version=-1)))

    def test_rule_overlap_must_be_below_size(self) -> None:
        obj = _created(process_rule={"mode": "custom", "max_tokens": 32, "chunk_overlap": 32})
        assert "chunk_overlap" in _reason(json.dumps(obj))

    def test_empty_batch_import(self) -> None:
        obj = _wire(SegmentsBatchImported(**COMMON, job_id="j", segments=[{"content": "x"}]))
        obj["segments"] = []
        assert "segments" in _reason(json.dumps(obj))

    def test_invalid_event_is_permanent(self) -> None:
        with pytest.raises(PermanentError):
            decode_event(b"[]")


class TestSchemaValidPoison:
    """Issue 20 item 9: events the schema took that then failed in a stage on every
    retry (a database, tokenizer or JSON encoder refusing them), ~10 s of retries
    each before a raw dead letter. Now they are InvalidEvent, with the reason."""

    @pytest.mark.parametrize("text", ["a\ud800b", "tail\udfff", "\udc00\ud800 reversed"])
    def test_a_lone_surrogate_in_content(self, text: str) -> None:
        raw = json.dumps(_created(content=text))  # ensure_ascii: as a \\udXXX escape
        reason = _reason(raw)
        assert "content" in reason and "surrogate" in reason
        assert "surrogate" in _reason(raw.encode())

    @pytest.mark.parametrize(
        ("obj", "where"),
        [
            (_created(event_id="id-\ud800"), "event_id"),
            (_created(source="a\udbff.txt"), "source"),
            (
                _wire(SegmentsBatchImported(**COMMON, job_id="j", segments=[{"content": "x"}]))
                | {"segments": [{"content": "ok"}, {"content": "q", "answer": "\ud800"}]},
                "segments[1].answer",
            ),
            (
                _wire(DocumentParsed(**COMMON, source="s", text="t", chars=1))
                | {"text": "x\udc80"},
                "text",
            ),
        ],
    )
    def test_a_lone_surrogate_anywhere_is_named(self, obj: dict[str, Any], where: str) -> None:
        reason = _reason(json.dumps(obj))
        assert reason.startswith(where) and "surrogate" in reason

    def test_a_lone_surrogate_in_a_str_or_dict_given_directly(self) -> None:
        assert "surrogate" in _reason(json.dumps(_created(content="a\ud800"), ensure_ascii=False))
        with pytest.raises(InvalidEvent, match="surrogate"):
            decode_lifecycle_event(_created(content="a\ud800"))

    def test_surrogate_pairs_and_escaped_backslashes_are_text(self) -> None:
        emoji = "smile \U0001f600 and a literal \\ud800"  # a pair; a backslash, then text
        raw = json.dumps(_created(content=emoji))
        assert "\\ud83d\\ude00" in raw
        assert decode_event(raw).content == emoji  # type: ignore[union-attr]

    @pytest.mark.parametrize("separator", ["\\x", "\\u12", "\\", "a\\N{NO SUCH NAME}", "\\ud800"])
    def test_a_separator_that_does_not_decode(self, separator: str) -> None:
        obj = _created(process_rule={"mode": "custom", "separator": separator})
        assert "separator" in _reason(json.dumps(obj))

    def test_a_separator_that_decodes_to_nothing(self) -> None:
        obj = _created(process_rule={"mode": "custom", "separator": "\\\n"})
        assert "decodes to nothing" in _reason(json.dumps(obj))

    @pytest.mark.parametrize(
        ("typed", "meant"), [("\\n\\n", "\n\n"), ("###", "###"), ("\\t|", "\t|")]
    )
    def test_separators_that_decode(self, typed: str, meant: str) -> None:
        assert ProcessRule(mode="custom", separator=typed).decoded_separator == meant

    @pytest.mark.parametrize("version", [2**63, 2**64, 10**30])
    def test_a_version_the_database_cannot_hold(self, version: int) -> None:
        assert "version" in _reason(json.dumps(_created(version=version)))
        stage = _wire(DocumentParsed(**COMMON, source="s", text="t", chars=1)) | {
            "version": version
        }
        assert "version" in _reason(json.dumps(stage))

    def test_the_largest_version_is_accepted(self) -> None:
        assert decode_event(json.dumps(_created(version=2**63 - 1))).version == 2**63 - 1

    @pytest.mark.parametrize(
        ("obj", "field"),
        [
            (_wire(SegmentDeleted(**COMMON, segment_id=1)) | {"segment_id": 2**31}, "segment_id"),
            (
                _wire(DocumentParsed(**COMMON, source="s", text="t", chars=1)) | {"chars": 2**63},
                "chars",
            ),
        ],
    )
    def test_other_integers_past_their_columns(self, obj: dict[str, Any], field: str) -> None:
        assert field in _reason(json.dumps(obj))


class TestOverlap:
    """Issue 20 item 10: max_tokens 16 with chunk_overlap 15 made 9,267 segments
    from 61,000 characters."""

    def test_overlap_above_half_of_max_tokens_is_refused(self) -> None:
        obj = _created(process_rule={"mode": "custom", "max_tokens": 16, "chunk_overlap": 15})
        reason = _reason(json.dumps(obj))
        assert "chunk_overlap 15 is more than half of max_tokens 16 (at most 8)" in reason

    @pytest.mark.parametrize(("size", "overlap"), [(16, 8), (17, 8), (512, 256), (16, 0)])
    def test_up_to_half_is_accepted(self, size: int, overlap: int) -> None:
        obj = _created(
            process_rule={"mode": "custom", "max_tokens": size, "chunk_overlap": overlap}
        )
        assert decode_event(json.dumps(obj)).process_rule.chunk_overlap == overlap  # type: ignore[union-attr]


class TestLifecycleDecoding:
    def test_accepts_lifecycle_events_from_dict_and_json(self) -> None:
        obj = _created()
        assert isinstance(decode_lifecycle_event(obj), DocumentCreated)
        assert isinstance(decode_lifecycle_event(json.dumps(obj)), DocumentCreated)

    def test_rejects_stage_events(self) -> None:
        obj = _wire(SegmentsLoaded(**COMMON, index_node_ids=["n"]))
        with pytest.raises(InvalidEvent, match="invalid lifecycle event"):
            decode_lifecycle_event(obj)


class TestJsonSchemas:
    def test_every_type_has_a_schema(self) -> None:
        schemas = json_schemas()
        assert set(schemas) == ALL_TYPES
        assert set(schemas) >= LIFECYCLE_TYPES

    def test_schemas_describe_their_type_and_required_fields(self) -> None:
        schemas = json_schemas()
        for type_name, schema in schemas.items():
            assert schema["type"] == "object"
            assert schema["properties"]["type"]["const"] == type_name
            # a dataset-wide event is keyed by its dataset and names no document
            keys = (
                {"dataset_id"} if type_name == "dataset.deleted" else {"dataset_id", "document_id"}
            )
            assert keys <= set(schema["required"])
            assert schema.get("additionalProperties") is False
            json.dumps(schema)  # serialisable as published JSON Schema
        assert "process_rule" in schemas["document.created"]["properties"]
        assert "segments" in schemas["segments.split"]["required"]


class TestDifyOperations:
    """Issue 19: the new lifecycle events."""

    def test_dataset_deleted_is_keyed_by_its_dataset(self) -> None:
        event = decode_lifecycle_event({"type": "dataset.deleted", "dataset_id": "ds-9"})
        assert isinstance(event, DatasetDeleted) and event.key == "ds-9"

    def test_dataset_deleted_names_no_document_and_no_version(self) -> None:
        for extra in ({"document_id": "doc-1"}, {"version": 3}):
            with pytest.raises(InvalidEvent):
                decode_lifecycle_event({"type": "dataset.deleted", "dataset_id": "d", **extra})

    @pytest.mark.parametrize("kind", ["segment.disabled", "segment.enabled", "segment.updated"])
    def test_a_segment_operation_names_its_segment(self, kind: str) -> None:
        body = {"type": kind, "dataset_id": "d", "document_id": "x", "content": "t"}
        if kind != "segment.updated":
            del body["content"]
        with pytest.raises(InvalidEvent, match="index_node_id or segment_id"):
            decode_lifecycle_event(body)
