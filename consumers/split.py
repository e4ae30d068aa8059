"""split: text -> segments. Cleans and splits the text, gives every segment
its doc_hash and index_node_id, diffs against what the document already has,
stores the new segment set, and sends on only what needs indexing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from domain.errors import DocumentError
from domain.events import DocumentParsed, Event, SegmentPayload, SegmentsRemoved, SegmentsSplit
from domain.model import IndexingStatus, build_segments, diff_segments
from domain.ports import ModelTokens
from domain.splitting import split_document
from infra.db.repository import Database, DocKey
from infra.kafka.runner import Emit
from infra.kafka.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class SplitStage:
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
            else:
                log.warning("split: %s is not handled yet; skipped", event.type)
        return out

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
            return []
        if not chunks:
            self.db.documents.set_status(
                key, event.version, IndexingStatus.ERROR, "splitting produced no segments"
            )
            return []
        segments = build_segments(event.dataset_id, event.document_id, chunks)
        diff = diff_segments(self.db.segments.existing(key), segments)
        state = self.db.documents.apply_split(key, event.version, segments, diff, event.chars)
        if state is None:
            return []
        common = {
            "tenant_id": event.tenant_id,
            "dataset_id": event.dataset_id,
            "document_id": event.document_id,
            "version": event.version,
        }
        out: list[Emit] = []
        if diff.removed:
            out.append(
                Emit(self.topics.segments, SegmentsRemoved(index_node_ids=diff.removed, **common))
            )
        todo = diff.to_index
        n = self.segments_per_event
        batches = (len(todo) + n - 1) // n
        for b in range(batches):
            payload = [
                SegmentPayload(
                    index_node_id=s.index_node_id,
                    doc_hash=s.doc_hash,
                    position=s.position,
                    content=s.content,
                    answer=s.answer,
                    tokens=s.tokens,
                )
                for s in todo[b * n : (b + 1) * n]
            ]
            out.append(
                Emit(
                    self.topics.segments,
                    SegmentsSplit(segments=payload, batch=b, batches=batches, **common),
                )
            )
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
