"""Every message kbstream puts on Kafka, as typed, versioned pydantic models.

Upstream systems publish the lifecycle events; the stages publish the stage
events. All of them are keyed by ``document_id`` so one document's events stay
in order in every partition of every topic.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from domain.documents import MAX_VERSION, DocKey
from domain.errors import InvalidEvent

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/+=-]+$")]
# what the database's columns hold: a version is a BIGINT, a segment id, position
# or token count an INTEGER (32-bit on PostgreSQL); past that a write fails on
# every retry, so such an event is refused when it is decoded
Version = Annotated[int, Field(ge=0, le=MAX_VERSION)]
Int32 = Annotated[int, Field(ge=0, le=2**31 - 1)]
Count = Annotated[int, Field(ge=0, le=MAX_VERSION)]

# A UTF-16 surrogate that json.loads left unpaired (a pair is joined into one
# code point): not Unicode, so no database, tokenizer or JSON encoder takes it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_IN_STR = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")

# chunk_overlap is at most this share of max_tokens: each chunk then brings at
# least half new text, so a document makes at most about twice the chunks (and
# embeds at most twice the tokens) it would without overlap. LangChain and
# LlamaIndex only require overlap < size, which lets 15 of 16 tokens repeat
# (9,267 segments from 61,000 characters); Dify's default is 50 of 500.
MAX_OVERLAP_RATIO = 0.5


def max_overlap(max_tokens: int) -> int:
    """The largest chunk_overlap allowed with chunks of ``max_tokens``."""
    return int(max_tokens * MAX_OVERLAP_RATIO)


def decode_separator(separator: str) -> str:
    """A custom separator as the splitter uses it: ``"\\n\\n"`` typed in JSON or a
    shell means two newlines. ValueError if the escapes do not decode or leave
    nothing to split on."""
    decoded = separator
    if "\\" in separator and separator.isascii():
        try:
            decoded = separator.encode().decode("unicode_escape")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"separator {separator!r} has an escape that does not decode ({exc.reason}); "
                "write it as the characters themselves or a valid escape like \\n"
            ) from None
    if not decoded:
        raise ValueError(f"separator {separator!r} decodes to nothing")
    if _LONE_SURROGATE.search(decoded):
        raise ValueError(f"separator {separator!r} decodes to a lone UTF-16 surrogate")
    return decoded


def _now() -> datetime:
    return datetime.now(UTC)


def _new_event_id() -> str:
    return str(uuid.uuid4())


class Topic(StrEnum):
    """The logical topics; ``KBSTREAM_TOPIC_PREFIX`` makes the physical names.
    Which stage reads and writes which is declared once, in consumers/pipeline.py."""

    LIFECYCLE = "lifecycle"  # upstream systems publish here
    PARSED = "parsed"
    SEGMENTS = "segments"
    EMBEDDED = "embedded"
    PROGRESS = "progress"
    DLQ = "dlq"


class DocForm(StrEnum):
    TEXT = "text"
    QA = "qa"
    PARENT_CHILD = "parent_child"


class ProcessRule(BaseModel):
    """How a document is cleaned and split. ``automatic`` uses the defaults;
    ``custom`` honours every field. max_tokens counts the embedding model's own
    tokens, never characters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["automatic", "custom"] = "automatic"
    remove_extra_whitespace: bool = True
    remove_urls_emails: bool = False
    separator: str | None = Field(default=None, max_length=32)
    max_tokens: int | None = Field(default=None, ge=16, le=8192)
    chunk_overlap: int | None = Field(
        default=None, ge=0, le=4096, description="at most half of max_tokens"
    )
    # parent-child documents: the parent chunk size (child uses max_tokens)
    parent_max_tokens: int | None = Field(default=None, ge=32, le=32768)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ProcessRule:
        if (
            self.max_tokens is not None
            and self.chunk_overlap is not None
            and self.chunk_overlap > max_overlap(self.max_tokens)
        ):
            raise ValueError(
                f"chunk_overlap {self.chunk_overlap} is more than half of max_tokens "
                f"{self.max_tokens} (at most {max_overlap(self.max_tokens)}): so much "
                "repeated text multiplies the segments; lower chunk_overlap"
            )
        if self.separator:
            decode_separator(self.separator)
        return self

    @property
    def decoded_separator(self) -> str | None:
        return decode_separator(self.separator) if self.separator else None


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=_new_event_id, min_length=1, max_length=64)
    schema_version: int = SCHEMA_VERSION
    occurred_at: datetime = Field(default_factory=_now)
    tenant_id: Id = "default"
    dataset_id: Id
    document_id: Id

    @property
    def key(self) -> str:
        """The Kafka message key: one document's events stay in one partition."""
        return self.document_id

    @property
    def doc_key(self) -> DocKey:
        return DocKey(self.tenant_id, self.dataset_id, self.document_id)


class _Event(_Envelope):
    """A stage event: it always carries the version parse resolved, and stages
    drop anything older than the document's current version."""

    version: Version


# --- upstream lifecycle ------------------------------------------------------


class _Lifecycle(_Envelope):
    """What upstream systems publish. Without a version, parse resolves one
    from the document's state when it claims the event: a created or updated
    document gets the version after the latest known one; a delete, a segment
    delete or a batch import applies to the current version."""

    version: int | None = Field(
        default=None,
        ge=0,
        le=MAX_VERSION,
        description="the document's revision (a small integer); omit it to mean "
        "'after the latest known version' (created/updated) or 'the current "
        "version' (deleted, segment.deleted, segments.batch_imported)",
    )


class _DocumentSource(_Lifecycle):
    source: str = Field(
        min_length=1, max_length=1024, description="file name or path shown to people"
    )
    content: str | None = Field(default=None, description="inline text, for small documents")
    uri: str | None = Field(
        default=None,
        max_length=4096,
        description="file:// reference under the allowed roots, or kbstream-upload:<key> "
        "for bytes uploaded to the database",
    )
    mime_type: str | None = Field(default=None, max_length=128)
    content_hash: str | None = Field(
        default=None, max_length=128, description="sha256 of the raw bytes"
    )
    doc_form: DocForm = DocForm.TEXT
    process_rule: ProcessRule = Field(default_factory=ProcessRule)

    @model_validator(mode="after")
    def _exactly_one_body(self) -> _DocumentSource:
        if (self.content is None) == (self.uri is None):
            raise ValueError("exactly one of 'content' and 'uri' must be given")
        return self


class DocumentCreated(_DocumentSource):
    type: Literal["document.created"] = "document.created"


class DocumentUpdated(_DocumentSource):
    type: Literal["document.updated"] = "document.updated"
    # "none" keeps segments that vanished from the new content (nothing is
    # ever deleted); "incremental" removes them.
    cleanup: Literal["incremental", "none"] = "incremental"


class DocumentDeleted(_Lifecycle):
    type: Literal["document.deleted"] = "document.deleted"


class SegmentDeleted(_Lifecycle):
    type: Literal["segment.deleted"] = "segment.deleted"
    index_node_id: str | None = Field(default=None, max_length=64)
    segment_id: Int32 | None = None

    @model_validator(mode="after")
    def _one_target(self) -> SegmentDeleted:
        if self.index_node_id is None and self.segment_id is None:
            raise ValueError("give index_node_id or segment_id")
        return self


class _DocumentSwitch(_Lifecycle):
    """Dify's document switches. They make no new version: without one they
    apply to the current version, with an older one they are stale."""


class DocumentDisabled(_DocumentSwitch):
    """Out of vector and keyword search; segments, vectors and cache stay."""

    type: Literal["document.disabled"] = "document.disabled"


class DocumentEnabled(_DocumentSwitch):
    """Back in search, from the embedding cache (nothing is embedded)."""

    type: Literal["document.enabled"] = "document.enabled"


class DocumentArchived(_DocumentSwitch):
    """Out of search like disabled; updates and segment operations are refused
    (status says why) until unarchived."""

    type: Literal["document.archived"] = "document.archived"


class DocumentUnarchived(_DocumentSwitch):
    type: Literal["document.unarchived"] = "document.unarchived"


class _SegmentTarget(_Lifecycle):
    index_node_id: str | None = Field(default=None, max_length=64)
    segment_id: Int32 | None = None

    @model_validator(mode="after")
    def _one_segment(self) -> _SegmentTarget:
        if self.index_node_id is None and self.segment_id is None:
            raise ValueError("give index_node_id or segment_id")
        return self


class SegmentDisabled(_SegmentTarget):
    """One segment out of both indexes; its row, vector cache and text stay."""

    type: Literal["segment.disabled"] = "segment.disabled"


class SegmentEnabled(_SegmentTarget):
    type: Literal["segment.enabled"] = "segment.enabled"


class SegmentUpdated(_SegmentTarget):
    """New text for one segment: only it is embedded again, both indexes
    follow. Its doc_hash, and so its index_node_id, change with the text;
    ``segment_id`` stays."""

    type: Literal["segment.updated"] = "segment.updated"
    content: str = Field(min_length=1)
    answer: str | None = None


# the key every dataset-wide event carries instead of a document id
DATASET_WIDE: Final = "_dataset"


class DatasetDeleted(_Lifecycle):
    """Everything of the dataset goes: each of its documents is deleted (in
    its own order, by its own key, downstream); `kbstream dataset delete`
    then purges what the tombstones still say. Keyed by the dataset."""

    type: Literal["dataset.deleted"] = "dataset.deleted"
    document_id: Literal["_dataset"] = Field(
        default=DATASET_WIDE, description="not a document: the event is keyed by dataset_id"
    )
    version: None = Field(default=None, description="unused: every document is deleted as it is")

    @property
    def key(self) -> str:
        return self.dataset_id


class ImportedSegment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    content: str = Field(min_length=1)
    answer: str | None = None


class SegmentsBatchImported(_Lifecycle):
    type: Literal["segments.batch_imported"] = "segments.batch_imported"
    job_id: Id
    segments: list[ImportedSegment] = Field(min_length=1)


# --- stage events ------------------------------------------------------------


class DocumentParsed(_Event):
    """parse -> split. The text travels inline up to a size limit, past it by
    reference to the claim-check store (``text_ref``)."""

    type: Literal["document.parsed"] = "document.parsed"
    source: str
    doc_form: DocForm = DocForm.TEXT
    process_rule: ProcessRule = Field(default_factory=ProcessRule)
    text: str | None = None
    text_ref: str | None = None
    chars: Count
    mime_type: str | None = None
    cleanup: Literal["incremental", "none"] = "incremental"


class SegmentPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    index_node_id: str
    doc_hash: str
    position: Int32
    content: str
    answer: str | None = None
    tokens: Int32 = 0


class SegmentsSplit(_Event):
    """split -> embed and index_keywords: one batch of a document's segments that
    need (re)indexing. Large documents produce several batches."""

    type: Literal["segments.split"] = "segments.split"
    segments: list[SegmentPayload]
    batch: Int32 = 0
    batches: Int32 = 1


class _SegmentLike(Protocol):
    # read-only: frozen Segment and StoredSegment both qualify
    @property
    def index_node_id(self) -> str: ...
    @property
    def doc_hash(self) -> str: ...
    @property
    def position(self) -> int: ...
    @property
    def content(self) -> str: ...
    @property
    def answer(self) -> str | None: ...
    @property
    def tokens(self) -> int: ...


def split_batches(
    tenant_id: str,
    dataset_id: str,
    document_id: str,
    version: int,
    segments: Sequence[_SegmentLike],
    per_event: int,
) -> list[SegmentsSplit]:
    """A document's segments to index, as events of at most ``per_event``
    (domain Segments and segment rows alike)."""
    payload = [
        SegmentPayload(
            index_node_id=s.index_node_id,
            doc_hash=s.doc_hash,
            position=s.position,
            content=s.content,
            answer=s.answer,
            tokens=s.tokens,
        )
        for s in segments
    ]
    batches = (len(payload) + per_event - 1) // per_event
    return [
        SegmentsSplit(
            tenant_id=tenant_id,
            dataset_id=dataset_id,
            document_id=document_id,
            version=version,
            segments=payload[b * per_event : (b + 1) * per_event],
            batch=b,
            batches=batches,
        )
        for b in range(batches)
    ]


class SegmentsRemoved(_Event):
    """split -> embed (forwarded in order to load_vectors) and index_keywords."""

    type: Literal["segments.removed"] = "segments.removed"
    index_node_ids: list[str]
    whole_document: bool = False


class EmbeddedRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    index_node_id: str
    doc_hash: str


class SegmentsEmbedded(_Event):
    """embed -> load_vectors. Vectors stay in the embedding cache (claim-check);
    the event names which ones."""

    type: Literal["segments.embedded"] = "segments.embedded"
    provider: str
    model: str
    segments: list[EmbeddedRef]


class SegmentsLoaded(_Event):
    type: Literal["segments.loaded"] = "segments.loaded"
    index_node_ids: list[str]


class KeywordsIndexed(_Event):
    type: Literal["keywords.indexed"] = "keywords.indexed"
    index_node_ids: list[str]


DocumentSwitch = DocumentDisabled | DocumentEnabled | DocumentArchived | DocumentUnarchived
SegmentSwitch = SegmentDisabled | SegmentEnabled

# what a person asks for (CLI verbs, HTTP paths) -> the event
DOCUMENT_SWITCHES: dict[str, type[DocumentSwitch]] = {
    "disable": DocumentDisabled,
    "enable": DocumentEnabled,
    "archive": DocumentArchived,
    "unarchive": DocumentUnarchived,
}
# what each document switch sets: (enabled, archived); None leaves it as it is
SWITCH_STATE: dict[str, tuple[bool | None, bool | None]] = {
    "document.disabled": (False, None),
    "document.enabled": (True, None),
    "document.archived": (None, True),
    "document.unarchived": (None, False),
}

LifecycleEvent = Annotated[
    DocumentCreated
    | DocumentUpdated
    | DocumentDeleted
    | SegmentDeleted
    | SegmentsBatchImported
    | DocumentDisabled
    | DocumentEnabled
    | DocumentArchived
    | DocumentUnarchived
    | SegmentDisabled
    | SegmentEnabled
    | SegmentUpdated
    | DatasetDeleted,
    Field(discriminator="type"),
]
Event = (
    DocumentCreated
    | DocumentUpdated
    | DocumentDeleted
    | SegmentDeleted
    | SegmentsBatchImported
    | DocumentDisabled
    | DocumentEnabled
    | DocumentArchived
    | DocumentUnarchived
    | SegmentDisabled
    | SegmentEnabled
    | SegmentUpdated
    | DatasetDeleted
    | DocumentParsed
    | SegmentsSplit
    | SegmentsRemoved
    | SegmentsEmbedded
    | SegmentsLoaded
    | KeywordsIndexed
)

AnyEvent = Annotated[Event, Field(discriminator="type")]


def resolved_version(event: Event) -> int:
    """The version of an event past parse: parse gives every lifecycle event
    without one the version it resolved before sending it on."""
    if event.version is None:
        raise InvalidEvent(f"{event.type} has no version; only parse may resolve it")
    return event.version


_ANY = TypeAdapter(AnyEvent)
_LIFECYCLE = TypeAdapter(LifecycleEvent)

# what upstream publishes on the lifecycle topic, in the order the docs list them
LIFECYCLE_EVENT_TYPES: tuple[str, ...] = (
    "document.created",
    "document.updated",
    "document.deleted",
    "segment.deleted",
    "segments.batch_imported",
    "document.disabled",
    "document.enabled",
    "document.archived",
    "document.unarchived",
    "segment.disabled",
    "segment.enabled",
    "segment.updated",
    "dataset.deleted",
)
LIFECYCLE_TYPES = frozenset(LIFECYCLE_EVENT_TYPES)


def decode_event(raw: bytes | str | None) -> Event:
    """Bytes off the wire -> a typed event, or InvalidEvent saying why not."""
    if raw is None:
        raise InvalidEvent("empty message (no value)")
    nul = b"\\u0000" in raw if isinstance(raw, bytes) else "\\u0000" in raw
    if nul:
        # databases refuse NUL in text; retrying could never help
        raise InvalidEvent("the event contains NUL characters (\\u0000); strip them upstream")
    try:
        obj: Any = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError) as exc:
        # ValueError covers JSONDecodeError and over-long integer literals;
        # RecursionError, absurdly deep nesting
        raise InvalidEvent(f"not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(obj).__name__}")
    if _may_hold_surrogates(raw) and (where := _lone_surrogate(obj)) is not None:
        raise InvalidEvent(
            f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
            "which is not Unicode text; fix the producer's encoding"
        )
    version = obj.get("schema_version", SCHEMA_VERSION)
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or version not in SUPPORTED_SCHEMA_VERSIONS
    ):
        raise InvalidEvent(
            f"unsupported schema_version {version!r}; this consumer reads "
            f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}"
        )
    try:
        event: Event = _ANY.validate_python(obj)
    except (ValidationError, RecursionError, ValueError, TypeError) as exc:
        if not isinstance(exc, ValidationError):
            raise InvalidEvent(f"schema-invalid: {str(exc)[:200]}") from exc
        raise InvalidEvent(
            f"schema-invalid {obj.get('type', '<no type>')!r}: {_brief(exc)}"
        ) from exc
    return event


def _may_hold_surrogates(raw: bytes | str) -> bool:
    """Cheap pre-check (a regex scans several times faster than ``in`` here): JSON
    can carry a surrogate only as a \\uD800-\\uDFFF escape (UTF-8 bytes of one do
    not decode), or as itself in a str. Valid pairs match too: the walk decides."""
    if isinstance(raw, bytes):
        return _SURROGATE_ESCAPE.search(raw) is not None
    return _SURROGATE_IN_STR.search(raw) is not None


def _lone_surrogate(obj: Any) -> str | None:
    """The path of the first string (key or value) holding a lone surrogate."""
    stack: list[tuple[str, Any]] = [("event", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                if _LONE_SURROGATE.search(k):
                    return f"a key of {path}"
                stack.append((f"{path}.{k}" if path != "event" else k, v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


def decode_lifecycle_event(raw: bytes | str | dict[str, Any]) -> Event:
    """For producers: validate what an upstream system wants to publish."""
    if isinstance(raw, dict) and (where := _lone_surrogate(raw)) is not None:
        raise InvalidEvent(f"invalid lifecycle event: {where} holds a lone UTF-16 surrogate")
    try:
        if isinstance(raw, dict):
            event: Event = _LIFECYCLE.validate_python(raw)
        else:
            event = _LIFECYCLE.validate_json(raw)
    except ValidationError as exc:
        raise InvalidEvent(f"invalid lifecycle event: {_brief(exc)}") from exc
    return event


def encode_event(event: Event) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()


def _brief(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every event type, keyed by type name."""
    models: list[type[BaseModel]] = [
        DocumentCreated,
        DocumentUpdated,
        DocumentDeleted,
        SegmentDeleted,
        SegmentsBatchImported,
        DocumentDisabled,
        DocumentEnabled,
        DocumentArchived,
        DocumentUnarchived,
        SegmentDisabled,
        SegmentEnabled,
        SegmentUpdated,
        DatasetDeleted,
        DocumentParsed,
        SegmentsSplit,
        SegmentsRemoved,
        SegmentsEmbedded,
        SegmentsLoaded,
        KeywordsIndexed,
    ]
    out: dict[str, Any] = {}
    for model in models:
        type_name = model.model_fields["type"].default
        out[type_name] = model.model_json_schema()
    return out
