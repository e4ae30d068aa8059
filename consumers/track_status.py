"""track_status: joins the two branches. A document is completed when every
segment of its current version is flagged by both branches, and the vector
index and the keyword index hold exactly its segments (removals included):
the rule is the Document aggregate's (Document.may_complete); this stage
loads what it needs, asks, and saves. The check reads state, not event
counts, so duplicates and reordering cannot fool it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from consumers.contract import StageResult
from domain.claim_check import removals_key
from domain.documents import DocKey, indexes_hold_exactly
from domain.events import Event
from domain.ports import KeywordIndex, UnitOfWork, UnitOfWorkFactory, VectorIndex


@dataclass(frozen=True)
class _Candidate:
    key: DocKey
    version: int
    segments: frozenset[str]


@dataclass
class TrackStatusStage:
    uow: UnitOfWorkFactory
    vectors: VectorIndex
    keywords: KeywordIndex
    name: str = "track_status"
    max_batch: int = 64

    def handle(self, events: Sequence[Event]) -> StageResult:
        keys = {e.doc_key for e in events}
        if not keys:
            return StageResult()
        candidates: list[_Candidate] = []
        with self.uow(readonly=True) as uow:
            for key, doc in uow.documents.get_many(keys).items():
                # the cheap flag count first; the stores only when it could complete
                if not doc.awaits_indexes(uow.segments.pending_count(key)):
                    continue
                segments = uow.segments.ids_for_document(key)
                candidates.append(_Candidate(key, doc.version, frozenset(segments)))
        # both indexes, outside any transaction, in one round trip per dataset each
        found = [c.key for c in candidates]
        texts = self.keywords.ids_for_documents(found) if found else {}
        ok = [c for c in candidates if indexes_hold_exactly(c.segments, texts.get(c.key, set()))]
        stored = self.vectors.ids_for_documents(c.key for c in ok) if ok else {}
        agreed = [c for c in ok if indexes_hold_exactly(c.segments, stored.get(c.key, set()))]
        if agreed:
            with self.uow() as uow:
                for c in sorted(agreed, key=lambda c: str(c.key)):
                    self._complete(uow, c)
                uow.commit()
        return StageResult()

    @staticmethod
    def _complete(uow: UnitOfWork, c: _Candidate) -> None:
        doc = uow.documents.get(c.key, for_update=True)
        if doc is None:
            return
        # the indexes held c.segments; the document's own set may have changed since
        agree = indexes_hold_exactly(uow.segments.ids_for_document(c.key), c.segments)
        if not doc.complete(c.version, uow.segments.pending_count(c.key), agree):
            return
        uow.documents.save(doc)
        uow.jobs.complete_for_document(c.key)
        # the indexes hold exactly the segments: no removal is owed any more
        uow.payloads.delete_prefix(removals_key(c.key))
