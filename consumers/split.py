"""split: text -> segments. Cleans and splits the text, gives every segment
its doc_hash and index_node_id, diffs against what the document already has,
stores the new segment set, and sends on only what needs indexing.

Everything split emits can be derived again from state, so a crash between
its commit and its publish loses nothing: on redelivery the diff re-sends
every segment not yet flagged by both branches, and the removals still owed
to the indexes are kept in the claim-check store until the document
completes (track_status clears them)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from consumers.contract import StageResult
from consumers.ownership import foreign_ids_error
from domain.claim_check import check_text_ref, document_prefix, removals_key
from domain.documents import DocKey, Document, IndexingStatus, SplitCounts, owed_removals
from domain.errors import DocumentError
from domain.events import (
    DocumentDeleted,
    DocumentEnabled,
    DocumentParsed,
    DocumentSwitch,
    DocumentUnarchived,
    Event,
    SegmentDeleted,
    SegmentDisabled,
    SegmentsBatchImported,
    SegmentsRemoved,
    SegmentSwitch,
    SegmentUpdated,
    Topic,
    resolved_version,
    split_batches,
)
from domain.ports import ModelTokens, UnitOfWork, UnitOfWorkFactory
from domain.segments import (
    ChunkText,
    ExistingSegment,
    Segment,
    StoredSegment,
    build_segments,
    diff_segments,
    make_index_node_id,
)
from domain.splitting import split_document

log = logging.getLogger(__name__)


@dataclass
class SplitStage:
    uow: UnitOfWorkFactory
    tokens: ModelTokens
    segments_per_event: int = 32
    name: str = "split"
    max_batch: int = 4
    max_segments: int | None = 10_000  # per document; more is a document error

    def handle(self, events: Sequence[Event]) -> StageResult:
        result = StageResult()
        texts, skip = self._read(events, result)
        # the slow part (tokenizing), outside any transaction
        prepared: dict[int, list[Segment]] = {}
        token_counts: dict[int, list[int]] = {}
        for i, event in enumerate(events):
            if isinstance(event, DocumentParsed) and i in texts:
                try:
                    prepared[i] = self._segments(event, texts[i])
                except DocumentError as exc:
                    result.reject(event, exc)
                    skip.add(i)
            elif isinstance(event, SegmentsBatchImported):
                token_counts[i] = [self.tokens.count_tokens(s.content) for s in event.segments]
            elif isinstance(event, SegmentUpdated):
                token_counts[i] = [self.tokens.count_tokens(event.content)]
        with self.uow() as uow:
            # the batch's documents and owed removals read once, written once at the end
            keys = [e.doc_key for i, e in enumerate(events) if i not in skip]
            parsed = [e.doc_key for e in events if isinstance(e, DocumentParsed)]
            batch = _Batch(uow, keys, parsed)
            for i, event in enumerate(events):
                if i in skip:
                    continue  # rejected
                if isinstance(event, DocumentParsed):
                    self._split(batch, event, prepared.get(i), result)
                elif isinstance(event, DocumentDeleted):
                    self._delete_document(batch, event, result)
                elif isinstance(event, SegmentDeleted):
                    self._delete_segment(batch, event, result)
                elif isinstance(event, SegmentsBatchImported):
                    self._import(batch, event, token_counts[i], result)
                elif isinstance(event, DocumentSwitch):
                    self._reconcile_document(batch, event, result)
                elif isinstance(event, SegmentSwitch):
                    self._switch_segment(batch, event, result)
                elif isinstance(event, SegmentUpdated):
                    self._update_segment(batch, event, token_counts[i][0], result)
                else:
                    log.warning(
                        "split: %s does not belong on the parsed topic; skipped", event.type
                    )
            batch.save()
            uow.commit()
        return result

    # -- reading, before any write -------------------------------------------------

    def _read(
        self, events: Sequence[Event], result: StageResult
    ) -> tuple[dict[int, str], set[int]]:
        """The text of every parsed event whose version is still current, and
        the positions of the events rejected."""
        texts: dict[int, str] = {}
        rejected: set[int] = set()
        parsed = [(i, e) for i, e in enumerate(events) if isinstance(e, DocumentParsed)]
        if not parsed:
            return texts, rejected
        with self.uow(readonly=True) as uow:
            docs = uow.documents.get_many({e.doc_key for _, e in parsed})
            for i, event in parsed:
                doc = docs.get(event.doc_key)
                if doc is None or not doc.is_current(event.version):
                    continue  # dropped (and recorded) in the write below
                try:
                    texts[i] = self._text(uow, event)
                except DocumentError as exc:
                    result.reject(event, exc)
                    rejected.add(i)
        return texts, rejected

    @staticmethod
    def _text(uow: UnitOfWork, event: DocumentParsed) -> str:
        if event.text is not None:
            return event.text
        if event.text_ref is None:
            raise DocumentError("parsed event carries neither text nor text_ref")
        # derived from the event's own document and version, never taken on trust
        ref = check_text_ref(event.text_ref, event.doc_key, event.version)
        data = uow.payloads.get(ref)
        if data is None:
            raise DocumentError(
                f"parsed text {event.text_ref} is no longer in the claim-check store; "
                "publish the document again"
            )
        try:
            return data.decode()
        except UnicodeDecodeError as exc:  # retrying cannot change the bytes
            raise DocumentError(
                f"parsed text {event.text_ref} is not UTF-8 ({exc.reason}); publish the "
                "document again"
            ) from exc

    def _segments(self, event: DocumentParsed, text: str) -> list[Segment]:
        chunks = split_document(
            text,
            event.doc_form,
            event.process_rule,
            self.tokens,
            self.tokens.max_input_tokens,
            self.max_segments,
        )
        if not chunks:
            raise DocumentError("splitting produced no segments")
        return build_segments(
            event.dataset_id, event.document_id, chunks, tenant_id=event.tenant_id
        )

    # -- one write per batch ---------------------------------------------------------

    def _split(
        self,
        batch: _Batch,
        event: DocumentParsed,
        segments: list[Segment] | None,
        result: StageResult,
    ) -> None:
        key, uow = event.doc_key, batch.uow
        doc = batch.docs.get(key)
        if doc is None or segments is None or not doc.is_current(event.version):
            _drop(doc, event)
            return
        diff = diff_segments(batch.existing(key), segments)
        keep = event.cleanup == "none"
        removed = [] if keep else diff.removed
        totals = uow.segments.replace_split(doc, segments, diff, keep_removed=keep)
        batch.changed_segments(key)
        owed = batch.owe(key, removed)
        doc.split(
            event.version,
            SplitCounts(added=diff.added_count, kept=diff.kept_count, removed=len(removed)),
            totals,
            pending=bool(diff.to_index or owed),
            forget_content_hash=keep and bool(diff.removed),
        )
        if owed:
            result.emit(Topic.SEGMENTS, _removed(event, owed))
        self._emit_segments(result, event, diff.to_index)
        log.info(
            "split: %s v%s -> %d segments (%d to index, %d kept, %d removed, %d removals owed)",
            event.source,
            event.version,
            len(segments),
            len(diff.to_index),
            diff.kept_count,
            len(removed),
            len(owed),
        )

    def _delete_document(self, batch: _Batch, event: DocumentDeleted, result: StageResult) -> None:
        key, uow = event.doc_key, batch.uow
        doc = batch.docs.get(key)
        if doc is None or not (doc.deleted and doc.version == event.version):
            _drop(doc, event)
            return
        # the tenant's cached vectors that only this document's texts still use
        uow.embeddings.prune(key.tenant_id, key.dataset_id, [key.document_id])
        ids = uow.segments.delete_document(key)
        batch.changed_segments(key)
        if ids or doc.segment_count:
            # a redelivery finds nothing left: keep the first delivery's count
            doc.segments_purged(event.version, len(ids))
        uow.jobs.fail_for_document(key, "the document was deleted")
        # its parsed texts, uploads and owed removals: the whole-document
        # removal below reconciles everything still owed
        uow.payloads.delete_prefix(document_prefix(key))
        batch.forget_owed(key)
        # emitted even when nothing was left: downstream drops the document's orphans
        result.emit(
            Topic.SEGMENTS,
            _removed(event, ids, whole_document=True),
        )

    def _delete_segment(self, batch: _Batch, event: SegmentDeleted, result: StageResult) -> None:
        key, uow = event.doc_key, batch.uow
        doc = batch.docs.get(key)
        if doc is None or doc.deleted or resolved_version(event) < doc.version:
            _drop(doc, event)
            return
        gone = uow.segments.delete_one(key, event.index_node_id, event.segment_id)
        batch.changed_segments(key)
        if gone is None:
            log.info(
                "split: segment %s of %s not found (already deleted?)",
                event.index_node_id or event.segment_id,
                event.document_id,
            )
            # maybe a redelivery after the commit whose publish was lost: send
            # the removals still owed again (a delete by segment_id names no
            # index_node_id; the owed list is what remembers it). Repeating a
            # removal is harmless: the indexes reconcile by id.
            named: list[str] = []
            if event.index_node_id:
                owner = uow.segments.owners([event.index_node_id]).get(event.index_node_id)
                if owner is not None:  # alive, so not this document's
                    result.reject(event, foreign_ids_error(event, [event.index_node_id]))
                    return
                named.append(event.index_node_id)
            again = owed_removals(batch.owed(key), named, alive=frozenset())
            if again:
                result.emit(Topic.SEGMENTS, _removed(event, again))
            return
        doc.segment_deleted(resolved_version(event), gone.tokens, gone.word_count)
        # owed in the same transaction as the delete, until the document completes
        batch.owe(key, [gone.index_node_id])
        result.emit(
            Topic.SEGMENTS,
            _removed(event, [gone.index_node_id]),
        )

    def _import(
        self,
        batch: _Batch,
        event: SegmentsBatchImported,
        token_counts: list[int],
        result: StageResult,
    ) -> None:
        key, uow = event.doc_key, batch.uow
        doc = batch.docs.get(key)
        if doc is None or doc.deleted:
            uow.jobs.fail(key, event.job_id, f"document {event.document_id} does not exist")
            return
        limit = self.tokens.max_input_tokens
        for item, n in zip(event.segments, token_counts, strict=True):
            if n > limit:
                uow.jobs.fail(
                    key,
                    event.job_id,
                    f"segment {item.content[:40]!r}... has {n} tokens, above the model limit of "
                    f"{limit}; split it before importing",
                )
                return
        if resolved_version(event) < doc.version:
            uow.jobs.fail(
                key,
                event.job_id,
                "the document changed or was deleted before the import ran",
            )
            return
        start, hashes = uow.segments.hashes(key, exclude_job=event.job_id)
        chunks = [
            ChunkText(content=s.content, answer=s.answer, tokens=n)
            for s, n in zip(event.segments, token_counts, strict=True)
        ]
        segments = _offset_occurrences(
            build_segments(event.dataset_id, event.document_id, chunks, start, event.tenant_id),
            hashes,
            event,
        )
        fresh = uow.segments.append_imported(doc, event.job_id, segments)
        batch.changed_segments(key)
        doc.segments_imported(
            resolved_version(event),
            len(fresh),
            sum(s.tokens for s in fresh),
            sum(s.word_count for s in fresh),
        )
        # every segment of the job not yet in both indexes, not just the fresh
        # ones: a replay after a lost publish sends them again
        stored = uow.segments.by_ids([s.index_node_id for s in segments])
        todo = [
            row
            for s in segments
            if (row := stored.get(s.index_node_id)) is not None
            and not (row.vector_indexed and row.keywords_indexed)
        ]
        uow.jobs.processing(key, event.job_id, len(todo))
        self._emit_segments(result, event, todo)

    # -- Dify's switches and segment edits ---------------------------------------

    def _current(self, batch: _Batch, event: Event) -> Document | None:
        """The document, locked, if the event applies to its current version
        (else the event is dropped as stale)."""
        doc = batch.docs.get(event.doc_key)
        if doc is None or doc.deleted or resolved_version(event) < doc.version:
            _drop(doc, event)
            return None
        return doc

    def _reconcile_document(
        self, batch: _Batch, event: DocumentSwitch, result: StageResult
    ) -> None:
        """Parse already switched the document; make the indexes follow its
        state (not the event's: a disable and an enable in quick succession
        both end in what the document is now). A whole-document removal drops
        every entity of it that is not searchable; an enable or unarchive
        that reopened the document sends its searchable segments again, from
        the embedding cache."""
        doc = self._current(batch, event)
        if doc is None:
            return
        result.emit(Topic.SEGMENTS, _removed(event, [], whole_document=True))
        reopened = doc.status is IndexingStatus.INDEXING
        if isinstance(event, DocumentEnabled | DocumentUnarchived) and reopened:
            self._resend(batch, event, result, everything=True)

    def _switch_segment(self, batch: _Batch, event: SegmentSwitch, result: StageResult) -> None:
        doc = self._current(batch, event)
        if doc is None:
            return
        uow = batch.uow
        row = uow.segments.find(doc.key, event.index_node_id, event.segment_id)
        if row is None:
            log.info(
                "split: %s: segment %s of %s not found",
                event.type,
                event.index_node_id or event.segment_id,
                event.document_id,
            )
            return
        enabled = not isinstance(event, SegmentDisabled)
        uow.segments.switch(row.index_node_id, enabled)
        batch.changed_segments(doc.key)
        doc.segment_switched(resolved_version(event))
        if enabled:
            self._emit_segments(result, event, [row])
        else:
            result.emit(Topic.SEGMENTS, _removed(event, [row.index_node_id]))

    def _update_segment(
        self, batch: _Batch, event: SegmentUpdated, tokens: int, result: StageResult
    ) -> None:
        """New text for one segment: its row is rewritten (new doc_hash and
        index_node_id, same position and switch), the old id is owed to both
        indexes until the document completes, only the new text is embedded."""
        doc = self._current(batch, event)
        if doc is None:
            return
        uow = batch.uow
        limit = self.tokens.max_input_tokens
        if tokens > limit:
            result.reject(
                event,
                DocumentError(
                    f"segment.updated: the new text has {tokens} tokens, above the model "
                    f"limit of {limit}; shorten it"
                ),
            )
            return
        row = uow.segments.find(doc.key, event.index_node_id, event.segment_id)
        if row is None:
            # maybe a redelivery after the commit whose publish was lost (the
            # row has its new id now): send what is still owed again
            self._resend(batch, event, result, everything=False)
            return
        _, hashes = uow.segments.hashes(doc.key)
        hashes.remove(row.doc_hash)
        chunk = ChunkText(event.content, event.answer, row.parent, tokens)
        built = build_segments(
            event.dataset_id, event.document_id, [chunk], row.position, event.tenant_id
        )
        (new,) = _offset_occurrences(built, hashes, event)
        if new.index_node_id == row.index_node_id:
            self._resend(batch, event, result, everything=False)  # the same text again
            return
        uow.segments.rewrite(row.index_node_id, new, resolved_version(event))
        batch.changed_segments(doc.key)
        owed = batch.owe(doc.key, [row.index_node_id])
        doc.segment_switched(
            resolved_version(event), new.tokens - row.tokens, new.word_count - row.word_count
        )
        result.emit(Topic.SEGMENTS, _removed(event, owed))
        self._emit_segments(result, event, [new])

    def _resend(self, batch: _Batch, event: Event, result: StageResult, everything: bool) -> None:
        """Send the document's searchable segments through both branches again
        (``everything``: all of them, their flags cleared; else those not yet
        flagged by both) and the removals it still owes. Nothing is embedded:
        the cache holds their vectors."""
        key, uow = event.doc_key, batch.uow
        owed = batch.owed(key)
        if owed:
            result.emit(Topic.SEGMENTS, _removed(event, owed))
        rows = sorted(
            uow.segments.by_ids(sorted(uow.segments.ids_for_document(key))).values(),
            key=lambda r: r.position,
        )
        if everything:
            ids = [r.index_node_id for r in rows]
            uow.segments.mark("vector_indexed", ids, False)
            uow.segments.mark("keywords_indexed", ids, False)
            batch.changed_segments(key)
        else:
            rows = [r for r in rows if not (r.vector_indexed and r.keywords_indexed)]
        self._emit_segments(result, event, rows)

    def _emit_segments(
        self, result: StageResult, event: Event, todo: Sequence[Segment] | Sequence[StoredSegment]
    ) -> None:
        for batch in split_batches(
            event.tenant_id,
            event.dataset_id,
            event.document_id,
            resolved_version(event),
            todo,
            self.segments_per_event,
        ):
            result.emit(Topic.SEGMENTS, batch)


def _removed(event: Event, ids: list[str], whole_document: bool = False) -> SegmentsRemoved:
    return SegmentsRemoved(
        tenant_id=event.tenant_id,
        dataset_id=event.dataset_id,
        document_id=event.document_id,
        version=resolved_version(event),
        index_node_ids=ids,
        whole_document=whole_document,
    )


def _drop(doc: Document | None, event: Event) -> None:
    if doc is None:
        log.info("split: %s v%s of unknown %s dropped", event.type, event.version, event.doc_key)
        return
    doc.drop(event.type, resolved_version(event))
    log.info("split: %s", doc.last_dropped)


class _Batch:
    """One write unit of work's documents, locked and read in one statement
    and saved in one at the end (only those a rule changed), and the removals
    each owes the indexes: read in one query, written through."""

    def __init__(self, uow: UnitOfWork, keys: Sequence[DocKey], parsed: Sequence[DocKey]) -> None:
        self.uow = uow
        self.docs = uow.documents.get_many(keys, for_update=True)
        self._loaded = {k: d.copy() for k, d in self.docs.items()}
        self._owed = {
            k: json.loads(data) if data else []
            for k, data in uow.payloads.get_many([removals_key(k) for k in set(keys)]).items()
        }
        # the split segments of the documents split in this batch, read once
        self._existing = uow.segments.existing_many(set(parsed))

    def existing(self, key: DocKey) -> list[ExistingSegment]:
        if key not in self._existing:  # changed earlier in this batch: read again
            self._existing[key] = self.uow.segments.existing(key)
        return self._existing[key]

    def changed_segments(self, key: DocKey) -> None:
        self._existing.pop(key, None)

    def owed(self, key: DocKey) -> list[str]:
        """The removals the document still owes the indexes (see owe)."""
        return list(self._owed.get(removals_key(key), []))

    def owe(self, key: DocKey, removed: Sequence[str]) -> list[str]:
        """The removals the document owes after this change (domain.documents.
        owed_removals), kept durably until the document completes."""
        earlier = self.owed(key)
        if not (earlier or removed):
            return []  # nothing was owed and nothing is: no write, no read
        owed = owed_removals(earlier, removed, self.uow.segments.ids_for_document(key))
        ref = removals_key(key)
        if owed:
            self.uow.payloads.put(ref, json.dumps(owed).encode())
            self._owed[ref] = owed
        elif ref in self._owed:
            self.uow.payloads.delete_prefix(ref)
            del self._owed[ref]
        return owed

    def forget_owed(self, key: DocKey) -> None:
        """The document's payloads were deleted (a whole-document delete)."""
        self._owed.pop(removals_key(key), None)

    def save(self) -> None:
        changed = [d for k, d in self.docs.items() if d != self._loaded[k]]
        self.uow.documents.save_many(changed)


def _offset_occurrences(
    segments: list[Segment], existing_hashes: list[str], event: Event
) -> list[Segment]:
    """Imported text may repeat text the document already has: shift the
    occurrence number so the index_node_id is new, yet the same on a replay."""
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
