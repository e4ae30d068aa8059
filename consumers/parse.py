"""parse: lifecycle events -> text. Resolves the version of each event,
claims it on the document, reads the body (inline content, bytes uploaded to
the database, or a file reference), extracts text, and hands it to split
inline or, past the inline limit, through the claim-check store.

Every event parse sends on carries the version it resolved, so the stages
after it never see an event without one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TypeVar, cast

from consumers.contract import Emit, StageResult
from consumers.failpoints import failpoint
from domain.claim_check import parsed_key, parsed_prefix, upload_payload_key
from domain.documents import DocKey, Document, segment_event_version
from domain.errors import DocumentError
from domain.events import (
    SWITCH_STATE,
    DatasetDeleted,
    DocumentCreated,
    DocumentDeleted,
    DocumentParsed,
    DocumentSwitch,
    DocumentUpdated,
    Event,
    SegmentDeleted,
    SegmentDisabled,
    SegmentEnabled,
    SegmentsBatchImported,
    SegmentUpdated,
    Topic,
)
from domain.ports import DocumentReader, UnitOfWork, UnitOfWorkFactory

log = logging.getLogger(__name__)

Source = DocumentCreated | DocumentUpdated
# what split applies to the current version's segments
SegmentOperation = (
    SegmentsBatchImported | SegmentDeleted | SegmentDisabled | SegmentEnabled | SegmentUpdated
)


def _load_or_create_many(
    uow: UnitOfWork, events: Sequence[Event]
) -> tuple[dict[DocKey, Document], set[DocKey]]:
    """The batch's documents, locked, and the keys of those created here: every
    document a created, updated or deleted event names is created first if it
    is new (insert-if-absent: a row a concurrent writer inserted first stays)."""
    keys = {e.doc_key for e in events}
    docs = uow.documents.get_many(keys, for_update=True)
    new: dict[DocKey, Document] = {}
    for e in events:
        creates = isinstance(e, DocumentCreated | DocumentUpdated | DocumentDeleted)
        if creates and e.doc_key not in docs and e.doc_key not in new:
            source = e.source if isinstance(e, DocumentCreated | DocumentUpdated) else ""
            new[e.doc_key] = Document.new(e.doc_key, source=source)
    if new:
        uow.documents.add_many(list(new.values()))
        docs.update(uow.documents.get_many(new, for_update=True))
        missing = [k for k in new if k not in docs]
        if missing:  # pragma: no cover - a broken repository
            raise RuntimeError(f"document {missing[0]} vanished right after it was added")
    return docs, set(new)


@dataclass(frozen=True)
class _Claim:
    slot: int
    event: Source  # with the resolved version
    version: int


@dataclass
class ParseStage:
    uow: UnitOfWorkFactory
    reader: DocumentReader
    inline_text_bytes: int
    name: str = "parse"
    max_batch: int = 4

    def handle(self, events: Sequence[Event]) -> StageResult:
        result = StageResult()
        # what each event emits, by position, so the output keeps the input order
        slots: list[list[Emit]] = [[] for _ in events]
        # Two write units of work per batch, on purpose: the claims commit
        # first (status shows `parsing` while extraction runs, outside any
        # transaction), the results in a second one.
        claims = self._claim(events, slots, result)
        failpoint("parse.after_claim")
        uploads = self._uploads(claims)
        extracted: list[tuple[_Claim, str, str | None]] = []
        for claim in claims:
            event = claim.event
            try:
                upload = uploads.get(claim.slot)
                if isinstance(upload, DocumentError):
                    raise upload
                if upload is not None:
                    name = PurePath(event.source).name or event.source
                    text, mime = self.reader.extract(upload, name, event.mime_type)
                else:
                    text, mime = self.reader.read(event.content, event.uri, event.mime_type)
            except DocumentError as exc:
                result.reject(event, exc)
                continue
            extracted.append((claim, text, mime))
        if extracted:
            self._record(extracted, slots, result)
        for emits in slots:
            result.emits.extend(emits)
        return result

    def _claim(
        self, events: Sequence[Event], slots: list[list[Emit]], result: StageResult
    ) -> list[_Claim]:
        claims: list[_Claim] = []
        with self.uow() as uow:
            # the batch's documents in one read (created first where new), saved in one write
            docs, created = _load_or_create_many(uow, events)
            reached: set[DocKey] = set()  # created here, and an event has got to them
            touched: dict[DocKey, Document] = {}
            for i, event in enumerate(events):
                key = event.doc_key
                if isinstance(event, DocumentCreated | DocumentUpdated):
                    doc = touched[key] = docs[key]
                    reached.add(key)
                    if self._refused(doc, event, result):
                        continue
                    # no version: a new version, after everything known of the document
                    # a copy of the event that claimed it: that version again
                    version = doc.resolve_version(event.version, event.event_id)
                    if doc.start_parsing(
                        version,
                        event.source,
                        event.doc_form.value,
                        event.content_hash,
                        event.mime_type,
                        event_id=event.event_id,
                        uri=event.uri,
                    ):
                        claims.append(_Claim(i, _versioned(event, version), version))
                    else:
                        self._drop(doc, event.type, version, result)
                elif isinstance(event, DocumentDeleted):
                    # the tombstone makes every older event of this document stale
                    # at once; split removes the segments behind anything in flight.
                    # No version: delete what is there now, so the next version
                    # (e.g. upstream's v4 after v3 and a delete) brings it back.
                    doc = touched[key] = docs[key]
                    reached.add(key)
                    version = doc.applies_to(event.version)
                    if doc.delete(version):
                        slots[i].append(Emit(Topic.PARSED, _versioned(event, version)))
                    else:
                        self._drop(doc, event.type, version, result)
                elif isinstance(event, SegmentOperation):
                    # they change the current version's segments, never make a new one
                    # (a document this batch creates later does not exist yet for them)
                    known = key not in created or key in reached
                    current = docs.get(key) if known else None
                    applies_to = event.version
                    if applies_to is None:
                        applies_to = segment_event_version(None, current)
                    if isinstance(event, SegmentsBatchImported):
                        uow.jobs.create(key, event.job_id, len(event.segments))
                    if current is not None and self._refused(current, event, result):
                        touched[key] = current
                        if isinstance(event, SegmentsBatchImported):
                            uow.jobs.fail(key, event.job_id, current.last_dropped or "")
                        continue
                    slots[i].append(Emit(Topic.PARSED, _versioned(event, applies_to)))
                elif isinstance(event, DocumentSwitch):
                    known = key not in created or key in reached
                    self._switch(docs.get(key) if known else None, event, slots[i], result, touched)
                elif isinstance(event, DatasetDeleted):
                    self._delete_dataset(uow, event, slots[i], docs, touched)
                else:
                    log.warning(
                        "parse: %s does not belong on the lifecycle topic; skipped", event.type
                    )
            uow.documents.save_many(list(touched.values()))
            uow.commit()
        return claims

    def _switch(
        self,
        doc: Document | None,
        event: DocumentSwitch,
        emits: list[Emit],
        result: StageResult,
        touched: dict[DocKey, Document],
    ) -> None:
        """Applied here, in the lifecycle topic's order, so an update right
        after an archive is refused and search drops a disabled document at
        once; split then reconciles the indexes with the document's state."""
        if doc is None:
            log.info("parse: %s of unknown document %s dropped", event.type, event.doc_key)
            result.count("stale_dropped")
            return
        touched[doc.key] = doc
        version = doc.applies_to(event.version)
        enabled, archived = SWITCH_STATE[event.type]
        if doc.switch(version, enabled=enabled, archived=archived):
            emits.append(Emit(Topic.PARSED, _versioned(event, version)))
        else:
            self._drop(doc, event.type, version, result)

    @staticmethod
    def _delete_dataset(
        uow: UnitOfWork,
        event: DatasetDeleted,
        emits: list[Emit],
        docs: dict[DocKey, Document],
        touched: dict[DocKey, Document],
    ) -> None:
        """Tombstone every document of the dataset as it is now and hand split
        one document.deleted each, keyed by its document, so each delete runs
        the document's own delete path in its own order. A redelivery finds
        the tombstones and sends the same deletes again (split's are
        idempotent). A document created later, without a version, is a new
        version again, as after document.deleted."""
        for listed in uow.documents.list(event.tenant_id, event.dataset_id):
            # the batch's own copy where it has one: it holds this batch's changes
            doc = docs.get(listed.key, listed)
            if not doc.delete(doc.version):
                continue  # pragma: no cover - a document's own version is never newer
            touched[doc.key] = doc
            emits.append(
                Emit(
                    Topic.PARSED,
                    DocumentDeleted(
                        tenant_id=doc.tenant_id,
                        dataset_id=doc.dataset_id,
                        document_id=doc.document_id,
                        version=doc.version,
                        occurred_at=event.occurred_at,
                    ),
                )
            )

    def _refused(self, doc: Document, event: Event, result: StageResult) -> bool:
        """An archived document refuses updates and segment operations; the
        reason is kept for `status --document`."""
        reason = doc.refusal(event.type)
        if reason is None:
            return False
        doc.last_dropped = reason
        result.count("refused")
        log.warning("parse: %s: %s", doc.key, reason)
        return True

    def _uploads(self, claims: list[_Claim]) -> dict[int, bytes | DocumentError]:
        """The bytes of every claimed event whose body was uploaded to the
        database, read in one read-only unit of work; or why not."""
        out: dict[int, bytes | DocumentError] = {}
        wanted: dict[int, tuple[str, str]] = {}
        for claim in claims:
            try:
                key = upload_payload_key(claim.event.uri, claim.event.doc_key)
            except DocumentError as exc:
                out[claim.slot] = exc
                continue
            if key is not None:
                wanted[claim.slot] = (key, claim.event.source)
        if wanted:
            with self.uow(readonly=True) as uow:
                found = uow.payloads.get_many([key for key, _ in wanted.values()])
                for slot, (key, source) in wanted.items():
                    data = found.get(key)
                    out[slot] = (
                        data
                        if data is not None
                        else DocumentError(
                            f"the uploaded content of {source} is no longer in the database; "
                            "index the file again"
                        )
                    )
        return out

    def _record(
        self,
        extracted: list[tuple[_Claim, str, str | None]],
        slots: list[list[Emit]],
        result: StageResult,
    ) -> None:
        with self.uow() as uow:
            docs = uow.documents.get_many([c.event.doc_key for c, _, _ in extracted], True)
            for claim, text, mime in extracted:
                event, version = claim.event, claim.version
                doc = docs.get(event.doc_key)
                if doc is None:
                    continue
                if not doc.parsed(version, len(text)):
                    # a newer version (or a delete) claimed the document meanwhile
                    self._drop(doc, event.type, version, result)
                    continue
                text_ref = None
                if len(text.encode()) > self.inline_text_bytes:
                    text_ref = parsed_key(event.doc_key, version)
                    uow.payloads.put(
                        text_ref, text.encode(), replace_prefix=parsed_prefix(event.doc_key)
                    )
                parsed = self._parsed(event, version, text, text_ref, mime)
                slots[claim.slot].append(Emit(Topic.PARSED, parsed))
            uow.documents.save_many(list(docs.values()))
            uow.commit()

    @staticmethod
    def _parsed(
        event: Source, version: int, text: str, text_ref: str | None, mime: str | None
    ) -> DocumentParsed:
        return DocumentParsed(
            tenant_id=event.tenant_id,
            dataset_id=event.dataset_id,
            document_id=event.document_id,
            version=version,
            source=event.source,
            doc_form=event.doc_form,
            process_rule=event.process_rule,
            text=None if text_ref else text,
            text_ref=text_ref,
            chars=len(text),
            mime_type=mime,
            cleanup=event.cleanup if isinstance(event, DocumentUpdated) else "incremental",
        )

    @staticmethod
    def _drop(doc: Document, what: str, version: int, result: StageResult) -> None:
        # visible three ways: the log, the stale_dropped metric, `status --document`
        doc.drop(what, version)
        result.count("stale_dropped")
        log.warning("parse: %s: %s", doc.key, doc.last_dropped)


E = TypeVar("E", bound=Event)


def _versioned(event: E, version: int) -> E:
    """The event as parse sends it on: with the version it resolved."""
    if event.version == version:
        return event
    return cast(E, event.model_copy(update={"version": version}))
