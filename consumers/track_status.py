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
            # the whole batch in three reads: documents, flag counts, then segment ids
            docs = uow.documents.get_many(keys)
            pending = uow.segments.pending_counts(docs)
            # the cheap flag count first; the stores only when it could complete
            waiting = [k for k, doc in docs.items() if doc.awaits_indexes(pending[k])]
            segments = uow.segments.ids_for_documents(waiting) if waiting else {}
            for key in waiting:
                candidates.append(_Candidate(key, docs[key].version, frozenset(segments[key])))
        # both indexes, outside any transaction, in one round trip per dataset each
        found = [c.key for c in candidates]
        texts = self.keywords.ids_for_documents(found) if found else {}
        ok = [c for c in candidates if indexes_hold_exactly(c.segments, texts.get(c.key, set()))]
        stored = self.vectors.ids_for_documents(c.key for c in ok) if ok else {}
        agreed = [c for c in ok if indexes_hold_exactly(c.segments, stored.get(c.key, set()))]
        if agreed:
            with self.uow() as uow:
                self._complete(uow, agreed)
                uow.commit()
        return StageResult()

    @staticmethod
    def _complete(uow: UnitOfWork, agreed: list[_Candidate]) -> None:
        keys = sorted((c.key for c in agreed), key=str)
        docs = uow.documents.get_many(keys, for_update=True)
        # the indexes held c.segments; the documents' own sets may have changed since
        now = uow.segments.ids_for_documents(keys)
        pending = uow.segments.pending_counts(keys)
        done = []
        for c in agreed:
            doc = docs.get(c.key)
            agree = indexes_hold_exactly(now[c.key], c.segments)
            if doc is not None and doc.complete(c.version, pending[c.key], agree):
                done.append(doc)
        if not done:
            return
        uow.documents.save_many(done)
        uow.jobs.complete_for_documents([d.key for d in done])
        # the indexes hold exactly the segments: no removal is owed any more
        uow.payloads.delete_many([removals_key(d.key) for d in done])
