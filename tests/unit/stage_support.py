"""The six stages wired together in memory, for the stage unit tests: the
pipeline table (consumers/pipeline.py) builds every stage over the fakes of
tests/fakes.py, and ``run`` moves events along the table's topics the way
the broker would (one queue per consuming stage), until nothing is left."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from consumers.contract import Rejection, Stage, StageConfig, StageResult
from consumers.pipeline import PIPELINE, consumers_of
from domain.documents import DocKey, Document
from domain.events import (
    DocumentCreated,
    DocumentDeleted,
    DocumentParsed,
    DocumentUpdated,
    Event,
    ImportedSegment,
    ProcessRule,
    SegmentsBatchImported,
    SegmentsRemoved,
    SegmentsSplit,
    Topic,
)
from domain.segments import StoredSegment
from tests.fakes import (
    HashingEmbeddingDouble,
    InMemoryDocumentReader,
    InMemoryKeywordIndex,
    InMemoryUnitOfWorkFactory,
    InMemoryVectorIndex,
)

TENANT, DATASET, DOC = "t1", "ds", "doc"
KEY = DocKey(TENANT, DATASET, DOC)
# one segment per paragraph of ten words (the double counts words as tokens)
RULE = ProcessRule(mode="custom", max_tokens=16, chunk_overlap=0)


def paragraph(i: int, tag: str = "p") -> str:
    return " ".join(f"{tag}{i}w{j}" for j in range(10))


def text_of(*paragraphs: str) -> str:
    return "\n\n".join(paragraphs)


def created(text: str, version: int, doc: str = DOC, **kw: Any) -> DocumentCreated:
    return DocumentCreated(
        tenant_id=TENANT,
        dataset_id=DATASET,
        document_id=doc,
        version=version,
        source=f"{doc}.txt",
        content=text,
        process_rule=RULE,
        **kw,
    )


def updated(text: str, version: int, doc: str = DOC, **kw: Any) -> DocumentUpdated:
    return DocumentUpdated(
        tenant_id=TENANT,
        dataset_id=DATASET,
        document_id=doc,
        version=version,
        source=f"{doc}.txt",
        content=text,
        process_rule=RULE,
        **kw,
    )


def deleted(version: int, doc: str = DOC) -> DocumentDeleted:
    return DocumentDeleted(tenant_id=TENANT, dataset_id=DATASET, document_id=doc, version=version)


def imported(
    job_id: str, *contents: str, version: int = 10, doc: str = DOC
) -> SegmentsBatchImported:
    return SegmentsBatchImported(
        tenant_id=TENANT,
        dataset_id=DATASET,
        document_id=doc,
        version=version,
        job_id=job_id,
        segments=[ImportedSegment(content=c) for c in contents],
    )


def of_type(result: StageResult, kind: type[Any]) -> list[Any]:
    return [e.event for e in result.emits if isinstance(e.event, kind)]


def split_ids(result: StageResult) -> list[str]:
    """index_node_ids of every SegmentsSplit emitted, in order."""
    return [s.index_node_id for e in of_type(result, SegmentsSplit) for s in e.segments]


def removed_ids(result: StageResult) -> list[list[str]]:
    return [e.index_node_ids for e in of_type(result, SegmentsRemoved)]


@dataclass
class World:
    """Every port in memory, and the stages the pipeline table builds on them."""

    uow: InMemoryUnitOfWorkFactory = field(default_factory=InMemoryUnitOfWorkFactory)
    reader: InMemoryDocumentReader = field(default_factory=InMemoryDocumentReader)
    embedder: HashingEmbeddingDouble = field(default_factory=HashingEmbeddingDouble)
    vectors: InMemoryVectorIndex = field(default_factory=InMemoryVectorIndex)
    keyword_index: InMemoryKeywordIndex = field(default_factory=InMemoryKeywordIndex)
    stage_config: StageConfig = field(
        default_factory=lambda: StageConfig(inline_text_bytes=1024, segments_per_event=2)
    )
    rejected: list[Rejection] = field(default_factory=list)

    # -- StageDeps ---------------------------------------------------------------

    @property
    def tokens(self) -> HashingEmbeddingDouble:
        return self.embedder

    @property
    def model_identity(self) -> tuple[str, str, int]:
        return self.embedder.provider, self.embedder.model, self.embedder.dim

    def stage(self, name: str) -> Stage:
        return next(s.build(self) for s in PIPELINE if s.name == name)

    # -- driving the pipeline ------------------------------------------------------

    def run(self, *events: Event, skip: Sequence[str] = ()) -> list[Rejection]:
        """Publish lifecycle events and run every stage (but ``skip``) until no
        queue has anything left; returns the rejections of this run."""
        return self._drive([(Topic.LIFECYCLE, list(events))], skip)

    def deliver(self, result: StageResult, skip: Sequence[str] = ()) -> list[Rejection]:
        """Publish what one stage emitted, and run the stages after it."""
        return self._drive([(e.topic, [e.event]) for e in result.emits], skip)

    def _drive(
        self, published: list[tuple[Topic, list[Event]]], skip: Sequence[str]
    ) -> list[Rejection]:
        stages = {s.name: s.build(self) for s in PIPELINE if s.name not in skip}
        queues: dict[str, list[Event]] = {name: [] for name in stages}
        for topic, events in published:
            self._publish(queues, topic, events)
        rejected: list[Rejection] = []
        while any(queues.values()):
            for name, stage in stages.items():
                batch, queues[name] = queues[name], []
                for i in range(0, len(batch), stage.max_batch):
                    result = stage.handle(batch[i : i + stage.max_batch])
                    rejected.extend(result.rejected)
                    for emit in result.emits:
                        self._publish(queues, emit.topic, [emit.event])
        self.rejected.extend(rejected)
        return rejected

    @staticmethod
    def _publish(queues: dict[str, list[Event]], topic: Topic, events: list[Event]) -> None:
        for name in consumers_of(topic):
            if name in queues:
                queues[name].extend(events)

    # -- reading state ----------------------------------------------------------------

    def parsed(self, event: Event) -> DocumentParsed:
        """Run parse alone on one lifecycle event; its DocumentParsed."""
        (parsed,) = of_type(self.stage("parse").handle([event]), DocumentParsed)
        return parsed  # type: ignore[no-any-return]

    def doc(self, key: DocKey = KEY) -> Document:
        with self.uow(readonly=True) as uow:
            doc = uow.documents.get(key)
        assert doc is not None, f"no document {key}"
        return doc

    def ids_by_text(self, key: DocKey = KEY) -> dict[str, str]:
        """First word of a segment's content -> its index_node_id."""
        return {s.content.split()[0]: i for i, s in self.segments(key).items()}

    def segments(self, key: DocKey = KEY) -> dict[str, StoredSegment]:
        with self.uow(readonly=True) as uow:
            ids = sorted(uow.segments.ids_for_document(key))
            return uow.segments.by_ids(ids)

    def texts(self, key: DocKey = KEY) -> set[str]:
        """The document's ids in the keyword index."""
        return set(self.keyword_index.ids_for_document(key))

    def payload(self, ref: str) -> bytes | None:
        with self.uow(readonly=True) as uow:
            return uow.payloads.get(ref)

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self.uow(readonly=True) as uow:
            found = uow.jobs.find(TENANT, job_id)
        assert len(found) <= 1, found
        return found[0] if found else None

    def consistent(self, key: DocKey = KEY) -> bool:
        """Both indexes hold exactly the document's segments."""
        ids = set(self.segments(key))
        return set(self.vectors.ids_for_document(key)) == ids == self.texts(key)
