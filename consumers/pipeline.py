"""The pipeline, declared once: every topic with the events it carries, every
stage with its factory, input topics, output topics and the facts the rest of
kbstream decides per stage (whether it needs the embedding model, lingers for
fuller batches, how `up --workers auto` scales it, its pod sizing, what its
progress is counted in). The composition root, the runner, the supervisor,
observability and `kbstream top`, the AsyncAPI document, the CLI,
deploy/generate.py, docker-compose checks and the tests read this table;
adding a stage is one entry here plus its module.

    lifecycle -> [parse] -> parsed -> [split] -> segments -> [embed] -> embedded -> [load_vectors] -> progress
                                                 segments -> [index_keywords] -------------------> progress
                                                                                progress -> [track_status]
    anything a stage gives up on -> dlq
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from consumers.contract import Stage, StageDeps
from consumers.embed import EmbedStage
from consumers.index_keywords import IndexKeywordsStage
from consumers.load_vectors import LoadVectorsStage
from consumers.parse import ParseStage
from consumers.split import SplitStage
from consumers.track_status import TrackStatusStage
from domain.errors import PermanentError
from domain.events import LIFECYCLE_EVENT_TYPES, Topic


@dataclass(frozen=True)
class TopicSpec:
    topic: Topic
    description: str
    events: tuple[str, ...]  # event types it carries


class Scaling(StrEnum):
    """How `kbstream up --workers auto` runs a stage (kbstream/supervisor.py)."""

    # CPU-bound Python (extraction driving, tokenizing, jieba): scales with
    # processes, max(1, min(partitions, cpus // 4)) of them
    PROCESSES = "processes"
    # one process: the model already uses every core (or owns the GPU) and
    # loading it twice only costs memory; Milvus calls wait, they do not compute
    ONE_PROCESS = "one process"
    # a small transaction per event: stays a thread of `up`
    THREAD = "thread"


class Progress(StrEnum):
    """What a stage has done to segments, as a count in the database
    (kbstream/observability.py turns each into a query; `kbstream top` into
    segments/s)."""

    SEGMENTS = "segments"  # segment rows
    EMBEDDINGS = "embeddings"  # embedding cache entries
    VECTOR_INDEXED = "vector_indexed"
    KEYWORDS_INDEXED = "keywords_indexed"
    COMPLETED = "completed"  # segments of completed documents


@dataclass(frozen=True)
class Sizing:
    """Per-stage pod resources and the lag (events per replica) KEDA scales at
    (deploy/generate.py)."""

    cpu: str
    memory: str
    cpu_limit: str
    memory_limit: str
    lag_threshold: int


@dataclass(frozen=True)
class StageSpec:
    name: str
    description: str
    inputs: tuple[Topic, ...]
    outputs: tuple[Topic, ...]
    build: Callable[[StageDeps], Stage]
    scaling: Scaling
    sizing: Sizing
    progress: Progress | None = None  # None: nothing countable per segment
    # warm the embedding model before the stage runs: it is on the critical path
    needs_model: bool = False
    # wait up to KBSTREAM_EMBED_LINGER_MS for a fuller batch: only a model call gains
    lingers: bool = False
    # runs document extraction: the process starts the extraction forkserver first
    extracts: bool = False
    # its process's /readyz checks that Milvus answers
    ready_needs_milvus: bool = False
    # the process running it exports the documents gauges (once, not per pod)
    exports_document_gauges: bool = False

    @property
    def group(self) -> str:
        """The consumer group's name, before the deployment's group prefix."""
        return self.name


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        Topic.LIFECYCLE,
        "What happened to a document, published by upstream systems.",
        LIFECYCLE_EVENT_TYPES,
    ),
    TopicSpec(
        Topic.PARSED,
        "Extracted text (inline or by claim-check reference), and the lifecycle "
        "events split applies directly.",
        (
            "document.parsed",
            "document.deleted",
            "segment.deleted",
            "segments.batch_imported",
            "document.disabled",
            "document.enabled",
            "document.archived",
            "document.unarchived",
            "segment.disabled",
            "segment.enabled",
            "segment.updated",
        ),
    ),
    TopicSpec(
        Topic.SEGMENTS,
        "Segments to index and segments removed.",
        ("segments.split", "segments.removed"),
    ),
    TopicSpec(
        Topic.EMBEDDED,
        "Segments whose vectors are in the embedding cache; removals in order.",
        ("segments.embedded", "segments.removed"),
    ),
    TopicSpec(
        Topic.PROGRESS,
        "Branch completions the status tracker joins.",
        ("segments.loaded", "keywords.indexed"),
    ),
    TopicSpec(
        Topic.DLQ,
        "Events a stage gave up on, with the error in kb-* headers.",
        (),
    ),
)


PIPELINE: tuple[StageSpec, ...] = (
    StageSpec(
        "parse",
        "Reads a document's body and extracts its text.",
        (Topic.LIFECYCLE,),
        (Topic.PARSED,),
        lambda d: ParseStage(d.uow, d.reader, d.stage_config.inline_text_bytes),
        scaling=Scaling.PROCESSES,
        # sandboxed extraction children may use KBSTREAM_EXTRACT_MEMORY_BYTES (2 GiB) each
        sizing=Sizing("500m", "1Gi", "1", "3Gi", 50),
        extracts=True,
    ),
    StageSpec(
        "split",
        "Cleans and splits text into segments, diffs them against the stored set.",
        (Topic.PARSED,),
        (Topic.SEGMENTS,),
        lambda d: SplitStage(
            d.uow,
            d.tokens,
            d.stage_config.segments_per_event,
            max_segments=d.stage_config.max_segments_per_document,
        ),
        scaling=Scaling.PROCESSES,
        sizing=Sizing("500m", "512Mi", "1", "1Gi", 100),
        progress=Progress.SEGMENTS,
    ),
    StageSpec(
        "embed",
        "Fills the embedding cache for new doc_hashes (each text embedded once).",
        (Topic.SEGMENTS,),
        (Topic.EMBEDDED,),
        lambda d: EmbedStage(
            d.uow,
            d.embedder,
            # documents are often smaller than one event's worth of segments:
            # take more events per poll so a model call sees ~embed_max_segments
            max_batch=max(
                1, 4 * d.stage_config.embed_max_segments // d.stage_config.segments_per_event
            ),
        ),
        scaling=Scaling.ONE_PROCESS,
        # the model takes every core it gets; an event carries up to 32 segments
        sizing=Sizing("2", "1536Mi", "4", "3Gi", 20),
        progress=Progress.EMBEDDINGS,
        needs_model=True,
        lingers=True,
    ),
    StageSpec(
        "load_vectors",
        "Upserts cached vectors into the vector index, deletes removed ones.",
        (Topic.EMBEDDED,),
        (Topic.PROGRESS,),
        lambda d: LoadVectorsStage(d.uow, d.vectors, *d.model_identity[:2]),
        scaling=Scaling.ONE_PROCESS,
        sizing=Sizing("250m", "512Mi", "1", "1Gi", 100),
        progress=Progress.VECTOR_INDEXED,
        ready_needs_milvus=True,
    ),
    StageSpec(
        "index_keywords",
        "Upserts segment texts into the full-text (BM25) index, deletes removed ones.",
        (Topic.SEGMENTS,),
        (Topic.PROGRESS,),
        lambda d: IndexKeywordsStage(d.uow, d.keyword_index),
        scaling=Scaling.PROCESSES,
        sizing=Sizing("500m", "768Mi", "1", "1536Mi", 50),
        progress=Progress.KEYWORDS_INDEXED,
        ready_needs_milvus=True,
    ),
    StageSpec(
        "track_status",
        "Completes a document once both indexes hold exactly its segments.",
        (Topic.PROGRESS,),
        (),
        lambda d: TrackStatusStage(d.uow, d.vectors, d.keyword_index),
        scaling=Scaling.THREAD,
        sizing=Sizing("250m", "512Mi", "500m", "1Gi", 200),
        progress=Progress.COMPLETED,
        ready_needs_milvus=True,
        exports_document_gauges=True,
    ),
)

STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE)


def stage_spec(name: str) -> StageSpec:
    for spec in PIPELINE:
        if spec.name == name:
            return spec
    raise PermanentError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def scaled(scaling: Scaling) -> list[str]:
    """The stages `up --workers auto` runs as ``scaling`` says, in table order."""
    return [s.name for s in PIPELINE if s.scaling is scaling]


def topic_spec(topic: Topic) -> TopicSpec:
    return next(t for t in TOPICS if t.topic is topic)


def producers_of(topic: Topic) -> list[str]:
    return [s.name for s in PIPELINE if topic in s.outputs]


def consumers_of(topic: Topic) -> list[str]:
    return [s.name for s in PIPELINE if topic in s.inputs]
