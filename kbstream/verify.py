"""`kbstream verify`: do the database's segments, Milvus's vectors and the
keyword (full-text) index agree, document by document? With repair, converge
them: orphans are deleted directly; missing vectors or texts are re-indexed by
republishing their segments (the embedding cache makes that cheap); documents
stuck mid-pipeline are republished from their own reference: their upload in
the database, or their file reference if it is under the allowed roots. Never
from ``source``, a display name the publisher chose: an inline document cannot
be re-read, and the report says to publish it again."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from consumers.contract import Emit
from domain.claim_check import upload_payload_key
from domain.documents import DocKey, Document, IndexingStatus
from domain.errors import DocumentError
from domain.events import DocForm, DocumentUpdated, Topic, split_batches
from infra.extract import resolve_file_reference
from kbstream.bootstrap import Container
from kbstream.publishing import publish_and_wait
from producers.uploads import existing_upload

log = logging.getLogger(__name__)

PROBLEMS = (
    "missing_vector",  # a segment row without its vector
    "orphan_vector",  # a vector whose segment row is gone
    "duplicate_vector",  # the same index_node_id twice in Milvus
    "vector_wrong_document",  # a vector filed under another document
    "missing_keywords",  # a segment without its keyword index entity
    "orphan_keywords",  # a keyword index entity whose segment row is gone
    "not_indexed",  # a completed document's segment not flagged in both branches
    "disabled_vector",  # a disabled or archived segment still in the vector index
    "disabled_keywords",  # a disabled or archived segment still in the keyword index
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
    keyword_segments: int = 0
    drift: list[Drift] = field(default_factory=list)
    repaired: list[Drift] = field(default_factory=list)
    # stuck documents repair could not republish: (drift, why, what to do)
    not_repaired: list[tuple[Drift, str]] = field(default_factory=list)
    # one line for a lost or mostly empty vector index: rebuild it
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "documents": self.documents,
            "segments": self.segments,
            "vectors": self.vectors,
            "keyword_segments": self.keyword_segments,
            "clean": not self.drift,
            "drift": [d.to_dict() for d in self.drift],
            "repaired": [d.to_dict() for d in self.repaired],
            "not_repaired": [{**d.to_dict(), "reason": why} for d, why in self.not_repaired],
            "by_problem": dict(Counter(d.problem for d in self.drift)),
            "hint": self.hint,
        }


def verify(c: Container, dataset: str, stuck_after: float = 600.0) -> VerifyReport:
    tenant = c.settings.tenant
    report = VerifyReport(dataset)
    with c.uow(readonly=True) as uow:
        docs = {d.document_id: d for d in uow.documents.list(tenant, dataset)}
        segments = uow.segments.for_dataset(tenant, dataset)
    vectors, lost = _dataset_vectors(c, dataset)
    texts = c.keyword_index.ids(tenant, dataset)
    # a lost index, or a dataset from before the keyword index (migration 0005)
    if lost or (segments and min(len(vectors), len(texts)) < len(segments) / 2):
        report.hint = f"run: kbstream rebuild --dataset {dataset}"
    report.documents = sum(1 for d in docs.values() if not d.deleted)
    report.segments = sum(1 for s in segments.values() if s.searchable)
    report.vectors = len(vectors)
    report.keyword_segments = len(texts)

    def drift(problem: str, doc_id: str, node: str | None = None) -> None:
        d = docs.get(doc_id)
        report.drift.append(Drift(problem, doc_id, d.source if d else "", node))

    for node, seg in sorted(segments.items()):
        doc_id = seg.document_id
        if not seg.searchable:
            # disabled or archived: belongs out of both indexes
            if node in vectors:
                drift("disabled_vector", doc_id, node)
            if node in texts:
                drift("disabled_keywords", doc_id, node)
            continue
        if node not in vectors:
            drift("missing_vector", doc_id, node)
        else:
            vec_doc, count = vectors[node]
            if vec_doc != doc_id:
                drift("vector_wrong_document", doc_id, node)
            if count > 1:
                drift("duplicate_vector", doc_id, node)
        if node not in texts:
            drift("missing_keywords", doc_id, node)
        state = docs.get(doc_id)
        completed = state is not None and state.status is IndexingStatus.COMPLETED
        if completed and not (seg.vector_indexed and seg.keywords_indexed):
            drift("not_indexed", doc_id, node)
    for node, (vec_doc, _) in sorted(vectors.items()):
        if node not in segments:
            drift("orphan_vector", vec_doc, node)
    for node, doc_id in sorted(texts.items()):
        if node not in segments:
            drift("orphan_keywords", doc_id, node)
    cutoff = datetime.now(UTC) - timedelta(seconds=stuck_after)
    for d in docs.values():
        if d.status.in_flight:
            updated = d.updated_at
            if updated is not None and updated.tzinfo is None:
                updated = updated.replace(tzinfo=UTC)
            if updated is None or updated < cutoff:
                drift("stuck", d.document_id)
    return report


def _dataset_vectors(c: Container, dataset: str) -> tuple[dict[str, tuple[str, int]], bool]:
    """The dataset's vectors, read through its alias; (vectors, whether its
    registered index or alias is gone)."""
    from kbstream.serving import dataset_indexes, serving_index

    tenant = c.settings.tenant
    found = serving_index(c, dataset)
    if found is not None:
        return found[0].ids_with_duplicates(tenant, dataset), False
    if dataset_indexes(c, dataset).registered:
        return {}, True  # registered, but the alias (and its collection) is gone
    return c.vectors.ids_with_duplicates(tenant, dataset), False


REDO = (
    "missing_vector",
    "missing_keywords",
    "not_indexed",
    "vector_wrong_document",
    "duplicate_vector",
)
ORPHAN_VECTOR = ("orphan_vector", "vector_wrong_document", "duplicate_vector", "disabled_vector")
ORPHAN_KEYWORDS = ("orphan_keywords", "disabled_keywords")


def repair(
    c: Container, dataset: str, stuck_after: float = 600.0, timeout: float = 600.0
) -> VerifyReport:
    before = verify(c, dataset, stuck_after)
    tenant = c.settings.tenant
    orphan_vectors = [
        d.index_node_id for d in before.drift if d.problem in ORPHAN_VECTOR and d.index_node_id
    ]
    orphan_texts = [
        d.index_node_id for d in before.drift if d.problem in ORPHAN_KEYWORDS and d.index_node_id
    ]
    c.vectors.delete(orphan_vectors)
    c.keyword_index.delete(orphan_texts)

    # segments that must go through embed/load/keywords again
    redo: dict[str, set[str]] = {}
    for d in before.drift:
        if d.problem in REDO and d.index_node_id:
            redo.setdefault(d.document_id, set()).add(d.index_node_id)
    emits: list[Emit] = []
    for doc_id, nodes in sorted(redo.items()):
        emits.extend(_reindex(c, DocKey(tenant, dataset, doc_id), sorted(nodes)))
    stuck = {d.document_id: d for d in before.drift if d.problem == "stuck"}
    not_repaired: list[tuple[Drift, str]] = []
    if stuck:
        with c.uow(readonly=True) as uow:
            found = uow.documents.get_many(DocKey(tenant, dataset, i) for i in stuck)
        for doc in found.values():
            ev = _republish_source(c, doc)
            if isinstance(ev, str):
                log.warning("repair: stuck document %s not republished: %s", doc.key, ev)
                not_repaired.append((stuck[doc.document_id], ev))
            else:
                emits.append(Emit(Topic.LIFECYCLE, ev))
    if emits:
        publish_and_wait(c, emits, timeout=timeout, client_id="kbstream-verify")
    after = verify(c, dataset, stuck_after)
    after.repaired = [d for d in before.drift if d not in after.drift]
    after.not_repaired = [(d, why) for d, why in not_repaired if d in after.drift]
    return after


def _reindex(c: Container, key: DocKey, nodes: list[str]) -> list[Emit]:
    """Reset the segments' flags, move the document back to indexing and
    return its segments as events for embed and index_keywords."""
    with c.uow() as uow:
        doc = uow.documents.get(key, for_update=True)
        if doc is None or doc.deleted:
            return []
        if not doc.move_to(IndexingStatus.INDEXING, doc.version):
            # mid-parse or mid-split: the running version re-indexes its own segments
            log.info("repair skips %s: it is %s", key, doc.status.value)
            return []
        uow.segments.mark("vector_indexed", nodes, value=False)
        uow.segments.mark("keywords_indexed", nodes, value=False)
        uow.documents.save(doc)
        rows = sorted(uow.segments.by_ids(nodes).values(), key=lambda r: r.position)
        uow.commit()
    batches = split_batches(
        key.tenant_id,
        key.dataset_id,
        key.document_id,
        doc.version,
        rows,
        c.settings.segments_per_event,
    )
    return [Emit(Topic.SEGMENTS, e) for e in batches]


def _republish_source(c: Container, doc: Document) -> DocumentUpdated | str:
    """The document's next version, read again from what its current version
    was read from: its upload in the database, or its file reference if this
    process's KBSTREAM_ALLOWED_ROOTS cover it (parse's own check). Otherwise
    why not, in one line saying what to do. Reads nothing else: ``source`` is a
    display name the publisher chose, and may name any file."""
    if doc.inline_content:
        return (
            "it was published with inline content, which kbstream does not keep, so it "
            "cannot be read again: publish the document again with its content"
        )
    uri = doc.uri
    if uri is None:
        # claimed before the reference was recorded: only its own upload of
        # the content hash it recorded can be trusted to be the document
        uri = existing_upload(c.uow, doc.key, doc.content_hash)
        if uri is None:
            return (
                "kbstream did not record what it was read from and it has no upload "
                "in the database: publish the document again"
            )
    try:
        payload_key = upload_payload_key(uri, doc.key)
        if payload_key is None:
            requested, resolved = resolve_file_reference(uri, c.settings.roots)
            if not resolved.is_file():
                return f"its file {requested} is gone: publish the document again"
        else:
            with c.uow(readonly=True) as uow:
                if uow.payloads.get(payload_key) is None:
                    return (
                        "its upload is no longer in the database: index the file again "
                        "(kbstream index)"
                    )
    except DocumentError as exc:
        return f"its reference {uri} cannot be read here: {exc}"
    return DocumentUpdated(
        tenant_id=doc.tenant_id,
        dataset_id=doc.dataset_id,
        document_id=doc.document_id,
        version=doc.version + 1,  # explicit: publish_and_wait waits for it
        source=doc.source or doc.document_id,
        uri=uri,
        content_hash=doc.content_hash,
        mime_type=doc.mime_type,
        doc_form=DocForm(doc.doc_form),
    )
