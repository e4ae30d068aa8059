"""`kbstream verify`: do the database's segments, Milvus's vectors and the
keyword postings agree, document by document? With repair, converge them:
orphans are deleted directly; missing vectors or postings are re-indexed by
republishing their segments (the embedding cache makes that cheap); documents
stuck mid-pipeline are republished from their source file."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from domain.documents import IndexingStatus
from domain.events import DocumentUpdated, SegmentsSplit, split_batches
from infra.db.repository import DocKey, DocumentState
from kbstream.bootstrap import Container
from kbstream.stack import WorkerPool, broker_for
from producers.files import sha256_file

log = logging.getLogger(__name__)

PROBLEMS = (
    "missing_vector",  # a segment row without its vector
    "orphan_vector",  # a vector whose segment row is gone
    "duplicate_vector",  # the same index_node_id twice in Milvus
    "vector_wrong_document",  # a vector filed under another document
    "missing_postings",  # a segment with keywords but no postings
    "orphan_postings",  # postings whose segment row is gone
    "not_indexed",  # a completed document's segment not flagged in both branches
    "stuck",  # a document in parsing/splitting/indexing for too long
)


@dataclass
class Drift:
    problem: str
    document_id: str
    document: str
    index_node_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class VerifyReport:
    dataset: str
    documents: int = 0
    segments: int = 0
    vectors: int = 0
    postings_segments: int = 0
    drift: list[Drift] = field(default_factory=list)
    repaired: list[Drift] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "documents": self.documents,
            "segments": self.segments,
            "vectors": self.vectors,
            "postings_segments": self.postings_segments,
            "clean": not self.drift,
            "drift": [d.to_dict() for d in self.drift],
            "repaired": [d.to_dict() for d in self.repaired],
            "by_problem": dict(Counter(d.problem for d in self.drift)),
        }


def verify(c: Container, dataset: str, stuck_after: float = 600.0) -> VerifyReport:
    tenant = c.settings.tenant
    report = VerifyReport(dataset)
    docs = {d.document_id: d for d in c.db.documents.list(tenant, dataset)}
    report.documents = sum(1 for d in docs.values() if d.status is not IndexingStatus.DELETED)
    rows = c.db.segments.rows_for_dataset(tenant, dataset)
    report.segments = len(rows)
    vectors = c.vectors.ids_with_duplicates(tenant, dataset)
    report.vectors = len(vectors)
    postings = c.db.postings.nodes(tenant, dataset)
    report.postings_segments = len(postings)

    def source(doc_id: str) -> str:
        d = docs.get(doc_id)
        return d.source if d else ""

    for node, (doc_id, vkeys, pflag) in sorted(rows.items()):
        if node not in vectors:
            report.drift.append(Drift("missing_vector", doc_id, source(doc_id), node))
        else:
            vec_doc, count = vectors[node]
            if vec_doc != doc_id:
                report.drift.append(Drift("vector_wrong_document", doc_id, source(doc_id), node))
            if count > 1:
                report.drift.append(Drift("duplicate_vector", doc_id, source(doc_id), node))
        if node not in postings and c.keywords.extract(rows_content(c, node)):
            report.drift.append(Drift("missing_postings", doc_id, source(doc_id), node))
        state = docs.get(doc_id)
        if state and state.status is IndexingStatus.COMPLETED and not (vkeys and pflag):
            report.drift.append(Drift("not_indexed", doc_id, source(doc_id), node))
    for node, (vec_doc, _) in sorted(vectors.items()):
        if node not in rows:
            report.drift.append(Drift("orphan_vector", vec_doc, source(vec_doc), node))
    for node in sorted(postings):
        if node not in rows:
            doc_id = c.db.postings.document_of(node) or ""
            report.drift.append(Drift("orphan_postings", doc_id, source(doc_id), node))
    cutoff = datetime.now(UTC) - timedelta(seconds=stuck_after)
    for d in docs.values():
        if d.status in (
            IndexingStatus.WAITING,
            IndexingStatus.PARSING,
            IndexingStatus.SPLITTING,
            IndexingStatus.INDEXING,
        ):
            updated = d.updated_at
            if updated is not None and updated.tzinfo is None:
                updated = updated.replace(tzinfo=UTC)
            if updated is None or updated < cutoff:
                report.drift.append(Drift("stuck", d.document_id, d.source))
    return report


def rows_content(c: Container, node: str) -> str:
    row = c.db.segments.by_ids([node]).get(node)
    if row is None:
        return ""
    return row.content if not row.answer else f"{row.content}\n{row.answer}"


def repair(
    c: Container, dataset: str, stuck_after: float = 600.0, timeout: float = 600.0
) -> VerifyReport:
    before = verify(c, dataset, stuck_after)
    tenant = c.settings.tenant
    orphan_vectors = [
        d.index_node_id
        for d in before.drift
        if d.problem in ("orphan_vector", "vector_wrong_document", "duplicate_vector")
        and d.index_node_id
    ]
    orphan_postings = [
        d.index_node_id for d in before.drift if d.problem == "orphan_postings" and d.index_node_id
    ]
    c.vectors.delete(orphan_vectors)
    c.db.postings.delete_nodes(orphan_postings)

    # segments that must go through embed/load/keywords again
    redo: dict[str, set[str]] = {}
    for d in before.drift:
        if (
            d.problem
            in (
                "missing_vector",
                "missing_postings",
                "not_indexed",
                "vector_wrong_document",
                "duplicate_vector",
            )
            and d.index_node_id
        ):
            redo.setdefault(d.document_id, set()).add(d.index_node_id)
    stuck = [d.document_id for d in before.drift if d.problem == "stuck"]

    events: list[Any] = []
    for doc_id, nodes in sorted(redo.items()):
        key = DocKey(tenant, dataset, doc_id)
        state = c.db.documents.get(key)
        if state is None or state.status is IndexingStatus.DELETED:
            continue
        c.db.segments.mark("vector_indexed", sorted(nodes), value=False)
        c.db.segments.mark("keywords_indexed", sorted(nodes), value=False)
        c.db.documents.set_status(key, state.version, IndexingStatus.INDEXING)
        events.extend(_resend(c, state, sorted(nodes)))
    for doc_id in stuck:
        key = DocKey(tenant, dataset, doc_id)
        state = c.db.documents.get(key)
        if state is None:
            continue
        ev = _republish_source(c, state)
        if ev is not None:
            events.append(ev)
    if events:
        _publish_and_wait(c, dataset, events, timeout)
    after = verify(c, dataset, stuck_after)
    after.repaired = [d for d in before.drift if d not in after.drift]
    return after


def _resend(c: Container, state: DocumentState, nodes: list[str]) -> list[SegmentsSplit]:
    rows = sorted(c.db.segments.by_ids(nodes).values(), key=lambda r: r.position)
    return split_batches(
        state.tenant_id,
        state.dataset_id,
        state.document_id,
        state.version,
        rows,
        c.settings.segments_per_event,
    )


def _republish_source(c: Container, state: DocumentState) -> DocumentUpdated | None:
    path = Path(state.source)
    if not path.is_file():
        log.warning(
            "stuck document %s has no readable source file; publish it again upstream",
            state.document_id,
        )
        return None
    return DocumentUpdated(
        tenant_id=state.tenant_id,
        dataset_id=state.dataset_id,
        document_id=state.document_id,
        source=state.source,
        uri=path.resolve().as_uri(),
        content_hash=sha256_file(path),
    )


def _publish_and_wait(c: Container, dataset: str, events: list[Any], timeout: float) -> None:
    from infra.kafka.producer import EventPublisher

    roots = {str(Path(e.source).resolve().parent) for e in events if isinstance(e, DocumentUpdated)}
    if roots:
        import os

        s = c.settings
        c.settings = s.model_copy(
            update={
                "allowed_roots": os.pathsep.join(filter(None, [s.allowed_roots, *sorted(roots)]))
            }
        )
    with broker_for(c.settings) as runtime:
        pool = (
            WorkerPool(c, runtime.bootstrap, exclusive=True).start() if runtime.embedded else None
        )
        try:
            pub = EventPublisher(
                runtime.bootstrap, c.settings.max_event_bytes, client_id="kbstream-verify"
            )
            for e in events:
                topic = c.topics.lifecycle if isinstance(e, DocumentUpdated) else c.topics.segments
                pub.publish(topic, e)
            pub.flush()
            pub.close()
            keys = {DocKey(e.tenant_id, e.dataset_id, e.document_id) for e in events}
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                states = c.db.documents.versions(keys)
                if all(s.status.finished for s in states.values()):
                    return
                time.sleep(0.25)
            raise TimeoutError(f"repair did not finish within {timeout}s")
        finally:
            if pool is not None:
                pool.stop()
