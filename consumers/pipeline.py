"""The pipeline, declared once: every topic with the events it carries, every
stage with its factory, input topics and output topics. The composition root,
the AsyncAPI document, the CLI, docker-compose checks and the tests read this
table; adding a stage is one entry here plus its module.

    lifecycle -> [parse] -> parsed -> [split] -> segments -> [embed] -> embedded -> [load_vectors] -> progress
                                                 segments -> [index_keywords] -------------------> progress
                                                                                progress -> [track_status]
    anything a stage gives up on -> dlq
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from consumers.contract import Stage, StageDeps
from consumers.embed import EmbedStage
from consumers.index_keywords import IndexKeywordsStage
from consumers.load_vectors import LoadVectorsStage
from consumers.parse import ParseStage
from consumers.split import SplitStage
from consumers.track_status import TrackStatusStage
from domain.errors import PermanentError
from domain.events import Topic


@dataclass(frozen=True)
class TopicSpec:
    topic: Topic
    description: str
    events: tuple[str, ...]  # event types it carries


@dataclass(frozen=True)
class StageSpec:
    name: str
    description: str
    inputs: tuple[Topic, ...]
    outputs: tuple[Topic, ...]
    build: Callable[[StageDeps], Stage]

    @property
    def group(self) -> str:
        """The consumer group's name, before the deployment's group prefix."""
        return self.name


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        Topic.LIFECYCLE,
        "What happened to a document, published by upstream systems.",
        (
            "document.created",
            "document.updated",
            "document.deleted",
            "segment.deleted",
            "segments.batch_imported",
        ),
    ),
    TopicSpec(
        Topic.PARSED,
        "Extracted text (inline or by claim-check reference), and the lifecycle "
        "events split applies directly.",
        ("document.parsed", "document.deleted", "segment.deleted", "segments.batch_imported"),
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
    ),
    StageSpec(
        "load_vectors",
        "Upserts cached vectors into the vector index, deletes removed ones.",
        (Topic.EMBEDDED,),
        (Topic.PROGRESS,),
        lambda d: LoadVectorsStage(d.uow, d.vectors, *d.model_identity[:2]),
    ),
    StageSpec(
        "index_keywords",
        "Upserts segment texts into the full-text (BM25) index, deletes removed ones.",
        (Topic.SEGMENTS,),
        (Topic.PROGRESS,),
        lambda d: IndexKeywordsStage(d.uow, d.keyword_index),
    ),
    StageSpec(
        "track_status",
        "Completes a document once both indexes hold exactly its segments.",
        (Topic.PROGRESS,),
        (),
        lambda d: TrackStatusStage(d.uow, d.vectors, d.keyword_index),
    ),
)

STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE)


def stage_spec(name: str) -> StageSpec:
    for spec in PIPELINE:
        if spec.name == name:
            return spec
    raise PermanentError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def topic_spec(topic: Topic) -> TopicSpec:
    return next(t for t in TOPICS if t.topic is topic)


def producers_of(topic: Topic) -> list[str]:
    return [s.name for s in PIPELINE if topic in s.outputs]


def consumers_of(topic: Topic) -> list[str]:
    return [s.name for s in PIPELINE if topic in s.inputs]
