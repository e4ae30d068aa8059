"""parse: lifecycle events -> text. Reads the file a document.created/updated
event refers to (or its inline content), extracts text, and hands it to split
inline or, past the inline limit, through the claim-check store."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from domain.documents import IndexingStatus
from domain.errors import DocumentError
from domain.events import (
    DocumentCreated,
    DocumentDeleted,
    DocumentParsed,
    DocumentUpdated,
    Event,
    SegmentDeleted,
    SegmentsBatchImported,
)
from infra.db.repository import Database, DocKey
from infra.extract import ExtractLimits, extract_text, read_file_reference
from infra.kafka.runner import Emit, RejectsEvents
from infra.kafka.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class ParseStage(RejectsEvents):
    db: Database
    topics: Topics
    allowed_roots: Sequence[Path]
    limits: ExtractLimits
    inline_text_bytes: int
    name: str = "parse"
    max_batch: int = 4

    @property
    def input_topics(self) -> list[str]:
        return [self.topics.lifecycle]

    def handle(self, events: Sequence[Event]) -> list[Emit]:
        out: list[Emit] = []
        for event in events:
            key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
            if isinstance(event, DocumentCreated | DocumentUpdated):
                out.extend(self._parse(event))
            elif isinstance(event, DocumentDeleted):
                # the tombstone makes every older event of this document stale at
                # once; split removes the segments behind anything still in flight
                if self.db.documents.record_delete(key, event.version):
                    out.append(Emit(self.topics.parsed, event))
            elif isinstance(event, SegmentsBatchImported):
                self.db.jobs.create(event.job_id, key, len(event.segments))
                out.append(Emit(self.topics.parsed, event))
            elif isinstance(event, SegmentDeleted):
                out.append(Emit(self.topics.parsed, event))
            else:
                log.warning("parse: %s does not belong on the lifecycle topic; skipped", event.type)
        return out

    def _parse(self, event: DocumentCreated | DocumentUpdated) -> list[Emit]:
        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        state = self.db.documents.begin_parsing(
            key,
            event.version,
            event.source,
            event.doc_form.value,
            event.content_hash,
            event.mime_type,
        )
        if state is None:
            log.info(
                "parse: dropping stale %s v%s of %s", event.type, event.version, event.document_id
            )
            return []
        try:
            text, mime = self._extract(event)
        except DocumentError as exc:
            self.db.documents.set_status(key, event.version, IndexingStatus.ERROR, exc.reason)
            self.reject(event, exc)
            return []
        self.db.documents.set_status(key, event.version, IndexingStatus.SPLITTING, chars=len(text))
        inline = len(text.encode()) <= self.inline_text_bytes
        text_ref = None
        if not inline:
            prefix = f"parsed/{event.tenant_id}/{event.dataset_id}/{event.document_id}/"
            text_ref = f"{prefix}{event.version}"
            self.db.payloads.put(text_ref, text.encode(), replace_prefix=prefix)
        parsed = DocumentParsed(
            tenant_id=event.tenant_id,
            dataset_id=event.dataset_id,
            document_id=event.document_id,
            version=event.version,
            source=event.source,
            doc_form=event.doc_form,
            process_rule=event.process_rule,
            text=text if inline else None,
            text_ref=text_ref,
            chars=len(text),
            mime_type=mime,
            cleanup=event.cleanup if isinstance(event, DocumentUpdated) else "incremental",
        )
        return [Emit(self.topics.parsed, parsed)]

    def _extract(self, event: DocumentCreated | DocumentUpdated) -> tuple[str, str | None]:
        if event.content is not None:
            if len(event.content) > self.limits.max_chars:
                raise DocumentError(
                    f"inline content has {len(event.content)} characters, above the limit of "
                    f"{self.limits.max_chars}; send large documents by uri"
                )
            if not event.content.strip():
                raise DocumentError("the document is empty")
            return event.content, event.mime_type or "text/plain"
        assert event.uri is not None
        data, filename = read_file_reference(event.uri, self.allowed_roots, self.limits.max_bytes)
        extracted = extract_text(data, filename, event.mime_type, self.limits)
        return extracted.text, extracted.mime_type

    def on_dead_letter(self, event: Event, reason: str) -> None:
        key = DocKey(event.tenant_id, event.dataset_id, event.document_id)
        self.db.documents.set_status(
            key, event.version, IndexingStatus.ERROR, f"parse failed: {reason}"
        )
