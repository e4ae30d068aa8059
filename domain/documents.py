"""The Document aggregate: every rule of a document's life in one place.

Which version is current, whether an event is stale, whether a delete wins,
which status may follow which, and when a document may complete are decided
here, in plain Python. Repositories load and save documents; they decide
nothing. Each rule-changing method returns whether it applied, so a stage can
drop a stale event instead of overwriting newer work.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum

from domain.errors import DocumentError, IllegalTransition

# Versions are stored as signed 64-bit integers (BIGINT); events are refused past
# this at decode time, and no version is ever resolved beyond it.
MAX_VERSION = 2**63 - 1


class IndexingStatus(StrEnum):
    WAITING = "waiting"
    PARSING = "parsing"
    SPLITTING = "splitting"
    INDEXING = "indexing"
    COMPLETED = "completed"
    ERROR = "error"
    DELETED = "deleted"

    @property
    def finished(self) -> bool:
        return self in (IndexingStatus.COMPLETED, IndexingStatus.ERROR, IndexingStatus.DELETED)

    @property
    def in_flight(self) -> bool:
        return not self.finished


S = IndexingStatus

# Every status change a document may make, whatever causes it; the aggregate
# sets status nowhere else (_enter). A claim (start_parsing) restarts at
# PARSING from anywhere, a delete tombstones from anywhere, and DELETED is left
# only by a claim of a newer version. A split is authoritative for its
# version, whatever status a redelivery finds (a re-claimed parse, an error);
# imports and a segment delete reopen a document to INDEXING. A document never
# claimed (WAITING) has nothing to split or index.
TRANSITIONS: dict[IndexingStatus, frozenset[IndexingStatus]] = {
    S.WAITING: frozenset({S.PARSING, S.ERROR, S.DELETED}),
    S.PARSING: frozenset({S.PARSING, S.SPLITTING, S.INDEXING, S.COMPLETED, S.ERROR, S.DELETED}),
    S.SPLITTING: frozenset({S.PARSING, S.SPLITTING, S.INDEXING, S.COMPLETED, S.ERROR, S.DELETED}),
    S.INDEXING: frozenset({S.PARSING, S.INDEXING, S.COMPLETED, S.ERROR, S.DELETED}),
    S.COMPLETED: frozenset({S.PARSING, S.INDEXING, S.COMPLETED, S.ERROR, S.DELETED}),
    S.ERROR: frozenset({S.PARSING, S.INDEXING, S.COMPLETED, S.ERROR, S.DELETED}),
    S.DELETED: frozenset({S.PARSING, S.DELETED}),
}

# The moves within one version (move_to), a subset of TRANSITIONS: only
# forward, ERROR from any live status, INDEXING re-entered from COMPLETED or
# ERROR when segments are repaired.
FORWARD: dict[IndexingStatus, frozenset[IndexingStatus]] = {
    S.WAITING: frozenset({S.PARSING, S.ERROR}),
    S.PARSING: frozenset({S.PARSING, S.SPLITTING, S.ERROR}),
    S.SPLITTING: frozenset({S.SPLITTING, S.INDEXING, S.COMPLETED, S.ERROR}),
    S.INDEXING: frozenset({S.INDEXING, S.COMPLETED, S.ERROR}),
    S.COMPLETED: frozenset({S.INDEXING, S.COMPLETED, S.ERROR}),
    S.ERROR: frozenset({S.ERROR, S.INDEXING}),
    S.DELETED: frozenset(),
}

MAX_ERROR_CHARS = 4000


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DocKey:
    """A document's identity: the same document id in two tenants or two
    datasets is two documents."""

    tenant_id: str
    dataset_id: str
    document_id: str

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.dataset_id}/{self.document_id}"


@dataclass(frozen=True)
class SplitCounts:
    """What the last split of a version did, for the people reading status."""

    added: int = 0
    kept: int = 0
    removed: int = 0


@dataclass
class Document:
    key: DocKey
    version: int
    status: IndexingStatus = IndexingStatus.WAITING
    source: str = ""
    doc_form: str = "text"
    error: str | None = None
    content_hash: str | None = None
    mime_type: str | None = None
    # what the current version was read from: the event's uri (a file
    # reference or an upload), or inline content, which kbstream does not
    # keep. None for both: claimed before this was recorded (migration 0007).
    # `verify --repair` reads only this, never ``source`` (a display name).
    uri: str | None = None
    inline_content: bool | None = None
    chars: int = 0
    segment_count: int = 0
    tokens: int = 0
    word_count: int = 0
    embedded_texts: int = 0
    cache_hits: int = 0
    segments_added: int = 0
    segments_kept: int = 0
    segments_removed: int = 0
    # the version whose split set the change counters: a redelivered split of
    # the same version must not overwrite them with an empty diff
    split_version: int | None = None
    # the event_id of the lifecycle event that claimed the current version: a
    # redelivered or re-published copy of an unversioned event is that same
    # version again, not a newer one
    claimed_by: str | None = None
    # why the last event for this document was dropped (stale version, ...)
    last_dropped: str | None = None
    # Dify's switches, independent of the indexing status and kept across
    # versions: a disabled or archived document keeps its segments, vectors
    # and cache entries but is out of both indexes; an archived one also
    # refuses updates and segment operations until unarchived
    enabled: bool = True
    archived: bool = False
    updated_at: datetime | None = None
    completed_at: datetime | None = None
    error_at: datetime | None = None
    parsing_started_at: datetime | None = None
    splitting_started_at: datetime | None = None
    indexing_started_at: datetime | None = None
    pk: int | None = None  # the row id, owned by the repository

    # -- identity ------------------------------------------------------------

    @property
    def tenant_id(self) -> str:
        return self.key.tenant_id

    @property
    def dataset_id(self) -> str:
        return self.key.dataset_id

    @property
    def document_id(self) -> str:
        return self.key.document_id

    @property
    def deleted(self) -> bool:
        return self.status is IndexingStatus.DELETED

    @classmethod
    def new(cls, key: DocKey, version: int = 0, source: str = "") -> Document:
        return cls(key=key, version=version, source=source)

    # -- version fencing -------------------------------------------------------

    def resolve_version(self, version: int | None, event_id: str | None = None) -> int:
        """An event without a version comes after everything known of this
        document, unless it is a copy of the event that claimed the current
        version (a producer's retry, a redelivery): then it is that version."""
        if version is not None:
            return version
        if event_id is not None and event_id == self.claimed_by:
            return self.version
        if self.version >= MAX_VERSION:
            raise DocumentError(
                f"the document is at version {self.version}, the last one a version can "
                "hold; an event without a version cannot come after it (send a delete, "
                "then publish the document under a new document_id)"
            )
        return self.version + 1

    def is_stale(self, version: int) -> bool:
        """Older than the current version, or not newer than a delete."""
        if version < self.version:
            return True
        return self.deleted and version <= self.version

    def is_current(self, version: int) -> bool:
        """Work of exactly this version may still change the document."""
        return version == self.version and not self.deleted

    def applies_to(self, version: int | None) -> int:
        """The version an event that makes no new version (a delete, a segment
        change) applies to: its own, or without one the current version, so
        the next version (upstream's v4 after v3 and a delete) still wins."""
        return self.version if version is None else version

    def drop(self, what: str, version: int) -> None:
        """Record that an event was dropped as stale, for `status --document`."""
        self.last_dropped = (
            f"{what} v{version} dropped: document is at v{self.version} ({self.status.value})"
        )

    # -- transitions -----------------------------------------------------------

    def _enter(self, status: IndexingStatus, now: datetime, restart_clock: bool = True) -> None:
        """The one place a document's status changes: the table first, then
        when the new status began. Every caller has already decided that the
        event applies, so a move the table forbids is a bug, not a stale event."""
        if status not in TRANSITIONS[self.status]:
            raise IllegalTransition(
                f"document {self.key} v{self.version}: {self.status.value} -> {status.value} "
                "is not in the transition table"
            )
        self.status = status
        self.updated_at = now
        if status is IndexingStatus.PARSING:
            self.parsing_started_at = now
            self.completed_at = None
        elif status is IndexingStatus.SPLITTING:
            self.splitting_started_at = now
        elif status is IndexingStatus.INDEXING:
            self.completed_at = None
            if restart_clock:
                self.indexing_started_at = now
        elif status is IndexingStatus.COMPLETED:
            self.completed_at = now
        elif status is IndexingStatus.ERROR:
            self.error_at = now

    def start_parsing(
        self,
        version: int,
        source: str,
        doc_form: str = "text",
        content_hash: str | None = None,
        mime_type: str | None = None,
        now: datetime | None = None,
        event_id: str | None = None,
        uri: str | None = None,
    ) -> bool:
        """Claim ``version`` for processing (by the event ``event_id``), read
        from ``uri`` or, without one, from inline content. False when the event
        is stale. A redelivered event of the current version claims it again
        (its earlier attempt may have died half-way)."""
        if self.is_stale(version):
            return False
        now = now or utcnow()
        if version > self.version or self.status is IndexingStatus.DELETED:
            # a new version starts its own work counters
            self.embedded_texts = 0
            self.cache_hits = 0
        if version > self.version or event_id is not None:
            self.claimed_by = event_id
        self.version = version
        self._enter(IndexingStatus.PARSING, now)
        self.source = source
        self.doc_form = doc_form
        self.content_hash = content_hash
        self.mime_type = mime_type
        self.uri = uri
        self.inline_content = uri is None
        self.error = None
        self.error_at = None
        return True

    def delete(self, version: int, now: datetime | None = None) -> bool:
        """Tombstone as of ``version``: every older event is stale from now on.
        False when a newer version exists (the delete itself is stale)."""
        if version < self.version:
            return False
        self.version = version
        self._enter(IndexingStatus.DELETED, now or utcnow())
        self.error = None
        return True

    @property
    def searchable(self) -> bool:
        """Its enabled segments belong in the indexes."""
        return self.enabled and not self.archived and not self.deleted

    def refusal(self, what: str) -> str | None:
        """Why ``what`` (an update, a segment operation) is refused now, or None."""
        if self.archived:
            return f"{what} refused: the document is archived (unarchive it first)"
        return None

    def switch(
        self,
        version: int,
        enabled: bool | None = None,
        archived: bool | None = None,
        now: datetime | None = None,
    ) -> bool:
        """document.enabled/disabled/archived/unarchived, as of ``version``
        (the current one when the event has none). False when stale (older
        than the current version) or the document is deleted. A switch that
        changes what belongs in the indexes owes them removals or upserts,
        so a completed document is indexing again until they have followed;
        a repeated switch changes nothing (idempotent)."""
        if self.deleted or version < self.version:
            return False
        before = self.searchable
        if enabled is not None:
            self.enabled = enabled
        if archived is not None:
            self.archived = archived
        now = now or utcnow()
        self.updated_at = now
        if self.searchable != before:
            self._reopen(now)
        return True

    def segment_switched(
        self, version: int, tokens: int = 0, words: int = 0, now: datetime | None = None
    ) -> bool:
        """segment.enabled/disabled or segment.updated (which changes the
        document's totals by ``tokens`` and ``words``) applied: like a segment
        delete, the change is owed to both indexes."""
        if self.deleted or version < self.version:
            return False
        now = now or utcnow()
        self.tokens = max(0, self.tokens + tokens)
        self.word_count = max(0, self.word_count + words)
        self.updated_at = now
        self._reopen(now)
        return True

    def _reopen(self, now: datetime) -> None:
        if self.status is IndexingStatus.COMPLETED:
            self._enter(IndexingStatus.INDEXING, now)

    def forget(self, now: datetime | None = None) -> bool:
        """Blank what a tombstone still says about the deleted content (its
        source name, content hash, error and last-dropped texts) once its
        segments are gone. The row itself stays: its version and claim fence
        off late or replayed events of the deleted versions. False when the
        document is not such a tombstone or has nothing left to blank."""
        if not self.deleted or self.segment_count:
            return False
        if not (self.source or self.content_hash or self.error or self.last_dropped):
            return False
        self.source = ""
        self.content_hash = None
        self.error = None
        self.last_dropped = None
        self.updated_at = now or utcnow()
        return True

    def move_to(self, status: IndexingStatus, version: int, now: datetime | None = None) -> bool:
        """Move ``version`` on to ``status``; False if the version is no longer
        current or the transition is not allowed."""
        if not self.is_current(version) or status not in FORWARD[self.status]:
            return False
        self._enter(status, now or utcnow())
        return True

    def fail(self, version: int, reason: str, now: datetime | None = None) -> bool:
        """ERROR with a reason a person can act on; only for the current version."""
        if not self.is_current(version):
            return False
        self._enter(IndexingStatus.ERROR, now or utcnow())
        self.error = (reason or "unknown error")[:MAX_ERROR_CHARS]
        return True

    def parsed(self, version: int, chars: int, now: datetime | None = None) -> bool:
        if not self.move_to(IndexingStatus.SPLITTING, version, now):
            return False
        self.chars = chars
        return True

    def split(
        self,
        version: int,
        counts: SplitCounts,
        totals: tuple[int, int, int],
        pending: bool,
        forget_content_hash: bool = False,
        now: datetime | None = None,
    ) -> bool:
        """Record a new segment set. ``totals`` is (segments, tokens, words)
        after the split; with nothing ``pending`` (no segment to index, no
        removal to propagate) the document completes at once."""
        if not self.is_current(version):
            return False
        # the split is authoritative for the current version, whatever status a
        # redelivery finds (completed, error, a re-claimed parse)
        now = now or utcnow()
        self._enter(IndexingStatus.INDEXING if pending else IndexingStatus.COMPLETED, now)
        # indexing starts with the split, even when nothing is left to index
        self.indexing_started_at = now
        self.error = None
        self.segment_count, self.tokens, self.word_count = totals
        if self.split_version != version:
            self.segments_added = counts.added
            self.segments_kept = counts.kept
            self.segments_removed = counts.removed
            self.split_version = version
        if forget_content_hash:
            # vanished segments were kept on purpose; forget the file hash so
            # the next incremental sync updates this document and drops them
            self.content_hash = None
        return True

    def segments_imported(
        self, version: int, added: int, tokens: int, words: int, now: datetime | None = None
    ) -> bool:
        """Segments appended by a batch import; imports carry a newer version
        than the split they extend, so the check is 'not stale', not 'current'."""
        if self.deleted or version < self.version:
            return False
        if added:
            # they extend the running indexing, not restart its clock
            self._enter(IndexingStatus.INDEXING, now or utcnow(), restart_clock=False)
            self.segment_count += added
            self.tokens += tokens
            self.word_count += words
        return True

    def segment_deleted(
        self, version: int, tokens: int, words: int, now: datetime | None = None
    ) -> bool:
        """One segment removed by upstream. Its removal is owed to both indexes,
        so a completed document is indexing again until they have followed."""
        if self.deleted or version < self.version:
            return False
        now = now or utcnow()
        self.segment_count = max(0, self.segment_count - 1)
        self.tokens = max(0, self.tokens - tokens)
        self.word_count = max(0, self.word_count - words)
        self.updated_at = now
        if self.status is IndexingStatus.COMPLETED:
            self._enter(IndexingStatus.INDEXING, now)
        return True

    def segments_purged(self, version: int, removed: int) -> bool:
        """Every segment of a deleted document is gone."""
        if not (self.deleted and self.version == version):
            return False
        self.segments_removed = removed
        self.segments_added = 0
        self.segments_kept = 0
        self.segment_count = 0
        self.tokens = 0
        self.word_count = 0
        return True

    def count_embeddings(self, version: int, embedded: int, hits: int) -> bool:
        # imports carry a newer version than the document they extend
        if version < self.version:
            return False
        self.embedded_texts += embedded
        self.cache_hits += hits
        return True

    # -- completion ------------------------------------------------------------

    def awaits_indexes(self, pending_segments: int) -> bool:
        """Indexing, and both branches flagged every segment: only what the
        indexes hold can still keep the document from completing (the cheap
        check, before asking them)."""
        return self.status is IndexingStatus.INDEXING and pending_segments == 0

    def may_complete(self, version: int, pending_segments: int, stores_agree: bool) -> bool:
        """The completion rule: the current version is indexing, both branches
        flagged every segment, and both indexes hold exactly its segments
        (removals included; see indexes_hold_exactly)."""
        return self.is_current(version) and self.awaits_indexes(pending_segments) and stores_agree

    def complete(self, version: int, pending_segments: int, stores_agree: bool) -> bool:
        if not self.may_complete(version, pending_segments, stores_agree):
            return False
        return self.move_to(IndexingStatus.COMPLETED, version)

    # -- done, for a caller waiting on a version ------------------------------------

    def delete_settled(self, held: Iterable[Collection[str]]) -> bool:
        """A delete is done once split removed the rows and every index
        followed: their removals are still in flight when the rows are gone.
        ``held``: what each index still holds of the document; a lazy iterable
        is asked only as far as needed."""
        return self.deleted and self.segment_count == 0 and not any(held)

    def done(self, version: int, held: Iterable[Collection[str]]) -> bool:
        """What waiting for ``version`` means (`index`, `sync`, `verify
        --repair`): at least that version, in a finished status, and a delete
        settled in both indexes."""
        if self.version < version or not self.status.finished:
            return False
        return not self.deleted or self.delete_settled(held)

    def copy(self) -> Document:
        return replace(self)


def segment_event_version(version: int | None, doc: Document | None) -> int:
    """The version a segment event (segment.deleted, segments.batch_imported)
    applies to: segment events change the current version's segments and
    never make a new one. A document not known yet is at version 0."""
    if doc is None:
        return 0 if version is None else version
    return doc.applies_to(version)


def indexes_hold_exactly(segments: AbstractSet[str], *held: AbstractSet[str]) -> bool:
    """Each index holds exactly the document's segments: none still missing,
    and no removed one left behind (a removal still owed)."""
    return all(ids == segments for ids in held)


def owed_removals(
    earlier: Iterable[str], removed: Iterable[str], alive: AbstractSet[str]
) -> list[str]:
    """The removals a document owes the indexes: this change's plus those
    earlier changes still owe (their publish may have been lost), minus any
    id that is alive again. Sorted, so a replay sends the same event."""
    return sorted(set(earlier).union(removed) - alive)
