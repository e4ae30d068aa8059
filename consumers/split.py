"""split: text -> segments. Cleans and splits the text, gives every segment
its doc_hash and index_node_id, diffs against what the document already has,
stores the new segment set, and sends on only what needs indexing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from domain.documents import IndexingStatus
from domain.errors import DocumentError
from domain.events import (
    DocumentDeleted,
    DocumentParsed,
    Event,
    SegmentDeleted,
    SegmentsBatchImported,
    SegmentsRemoved,
    split_batches,
)
from domain.model import ChunkText, Segment, build_segments, diff_segments
from domain.ports import ModelTokens
from domain.splitting import split_document
from infra.db.repository import Database, DocKey
from infra.kafka.runner import Emit, RejectsEvents
from infra.kafka.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class SplitStage(RejectsEvents):
    db: Database
    topics: Topics
    tokens: ModelTokens
    segments_per_event: int = 32
    name: str = "split"
    max_batch: int = 4

    @property
    def input_topics(self) -> list[str]:
        return [self.topics.parsed]

    def handle(self, events: Sequence[Event]) -> list[Emit]:
        out: list[Emit] = []
        for event in events:
            if isinstance(event, DocumentParsed):
                out.extend(self._split(event))
            elif isinstance(event, DocumentDeleted):
                out.extend(self._delete_document(event))
            elif isinstance(event, SegmentDeleted):
                out.extend(self._delete_segment(event))
            elif isinstance(event, SegmentsBatchImported):
                out.extend(self._import(event))
            else:
                log.warning("split: %s does not belong on the parsed topic; skipped", event.type)
        return out

    def _delete_document(self, event: DocumentDeleted) -> list[Emit]:
        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        ids = self.db.documents.delete_segments(key, event.version)
        if ids is None:
            return []
        removed = SegmentsRemoved(index_node_ids=ids, whole_document=True, **self._common(event))
        return [Emit(self.topics.segments, removed)]

    def _delete_segment(self, event: SegmentDeleted) -> list[Emit]:
        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        gone = self.db.documents.delete_segment(
            key, event.version, event.index_node_id, event.segment_id
        )
        if gone is None:
            log.info(
                "split: segment %s of %s not found (already deleted?)",
                event.index_node_id or event.segment_id,
                event.document_id,
            )
            return []
        return [
            Emit(
                self.topics.segments, SegmentsRemoved(index_node_ids=[gone], **self._common(event))
            )
        ]

    def _import(self, event: SegmentsBatchImported) -> list[Emit]:
        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        current = self.db.documents.get(key)
        if current is None or current.status is IndexingStatus.DELETED:
            self.db.jobs.fail(event.job_id, f"document {event.document_id} does not exist")
            return []
        start, hashes = self.db.documents.segment_hashes(key, exclude_job=event.job_id)
        chunks = []
        for item in event.segments:
            n = self.tokens.count_tokens(item.content)
            if n > self.tokens.max_input_tokens:
                self.db.jobs.fail(
                    event.job_id,
                    f"segment {item.content[:40]!r}... has {n} tokens, above the model limit of "
                    f"{self.tokens.max_input_tokens}; split it before importing",
                )
                return []
            chunks.append(ChunkText(content=item.content, answer=item.answer, tokens=n))
        segments = _offset_occurrences(
            build_segments(event.dataset_id, event.document_id, chunks, start, event.tenant_id),
            hashes,
            event,
        )
        fresh = self.db.documents.import_segments(key, event.version, event.job_id, segments)
        if fresh is None:
            self.db.jobs.fail(
                event.job_id, "the document changed or was deleted before the import ran"
            )
            return []
        return self._emit_segments(event, fresh)

    @staticmethod
    def _common(event: Event) -> dict[str, object]:
        return {
            "tenant_id": event.tenant_id,
            "dataset_id": event.dataset_id,
            "document_id": event.document_id,
            "version": event.version,
        }

    def _emit_segments(self, event: Event, todo: list[Segment]) -> list[Emit]:
        batches = split_batches(
            event.tenant_id,
            event.dataset_id,
            event.document_id,
            event.version,
            todo,
            self.segments_per_event,
        )
        return [Emit(self.topics.segments, e) for e in batches]

    def _split(self, event: DocumentParsed) -> list[Emit]:
        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        current = self.db.documents.get(key)
        if current is None or current.version != event.version:
            log.info("split: dropping stale v%s of %s", event.version, event.document_id)
            return []
        try:
            text = self._text(event)
            chunks = split_document(
                text, event.doc_form, event.process_rule, self.tokens, self.tokens.max_input_tokens
            )
        except DocumentError as exc:
            self.db.documents.set_status(key, event.version, IndexingStatus.ERROR, exc.reason)
            self.reject(event, exc)
            return []
        if not chunks:
            self.db.documents.set_status(
                key, event.version, IndexingStatus.ERROR, "splitting produced no segments"
            )
            return []
        segments = build_segments(
            event.dataset_id, event.document_id, chunks, tenant_id=event.tenant_id
        )
        diff = diff_segments(self.db.segments.existing(key), segments)
        keep = event.cleanup == "none"
        state = self.db.documents.apply_split(
            key, event.version, segments, diff, event.chars, keep_removed=keep
        )
        if state is None:
            return []
        out: list[Emit] = []
        if diff.removed and not keep:
            out.append(
                Emit(
                    self.topics.segments,
                    SegmentsRemoved(index_node_ids=diff.removed, **self._common(event)),  # type: ignore[arg-type]
                )
            )
        todo = diff.to_index
        out.extend(self._emit_segments(event, todo))
        log.info(
            "split: %s v%s -> %d segments (%d to index, %d kept, %d removed)",
            event.source,
            event.version,
            len(segments),
            len(todo),
            diff.kept_count,
            len(diff.removed),
        )
        return out

    def _text(self, event: DocumentParsed) -> str:
        if event.text is not None:
            return event.text
        if event.text_ref is None:
            raise DocumentError("parsed event carries neither text nor text_ref")
        data = self.db.payloads.get(event.text_ref)
        if data is None:
            raise DocumentError(
                f"parsed text {event.text_ref} is no longer in the claim-check store; "
                "publish the document again"
            )
        return data.decode()

    def on_dead_letter(self, event: Event, reason: str) -> None:
        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        self.db.documents.set_status(
            key, event.version, IndexingStatus.ERROR, f"split failed: {reason}"
        )


def _offset_occurrences(
    segments: list[Segment], existing_hashes: list[str], event: Event
) -> list[Segment]:
    """Imported text may repeat text the document already has: shift the
    occurrence number so the index_node_id is new, yet the same on a replay."""
    from collections import Counter

    from domain.model import make_index_node_id

    seen = Counter(existing_hashes)
    out = []
    for s in segments:
        occurrence = seen[s.doc_hash]
        seen[s.doc_hash] += 1
        out.append(
            Segment(
                index_node_id=make_index_node_id(
                    event.dataset_id, event.document_id, s.doc_hash, occurrence, event.tenant_id
                ),
                doc_hash=s.doc_hash,
                position=s.position,
                content=s.content,
                answer=s.answer,
                parent=s.parent,
                tokens=s.tokens,
            )
        )
    return out
