"""The stage contract: what every stage is, whatever runtime drives it.

A stage takes a batch of decoded events and returns a StageResult: the events
to publish next and, explicitly, the events it rejects (permanently failed,
e.g. a broken document). The runtime (infra/kafka/processor.py) publishes the
emits, dead-letters the rejections, records their failure on the document
(consumers/failures.py), and only then commits offsets.

Stages must be idempotent: after a crash they see the same events again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from domain.events import Event, Topic
from domain.ports import (
    DocumentReader,
    EmbeddingProvider,
    KeywordIndex,
    ModelTokens,
    UnitOfWorkFactory,
    VectorIndex,
)


@dataclass(frozen=True)
class Emit:
    topic: Topic
    event: Event


@dataclass(frozen=True)
class Rejection:
    """One event of a batch that can never succeed; the rest of the batch goes on."""

    event: Event
    error: Exception


@dataclass
class StageResult:
    emits: list[Emit] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    # what the stage did, for metrics (e.g. "embedded_texts", "cache_hits");
    # the runtime exports them, so stages need no metrics library
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def emit(self, topic: Topic, event: Event) -> None:
        self.emits.append(Emit(topic, event))

    def reject(self, event: Event, error: Exception) -> None:
        self.rejected.append(Rejection(event, error))

    def extend(self, other: StageResult) -> None:
        self.emits.extend(other.emits)
        self.rejected.extend(other.rejected)
        for name, n in other.counts.items():
            self.count(name, n)


class Stage(Protocol):
    name: str
    max_batch: int

    def handle(self, events: Sequence[Event]) -> StageResult:
        """Do the stage's durable side effects for these events and say what
        to publish next. Raise TransientError to have the batch retried."""
        ...


@runtime_checkable
class Prefetches(Stage, Protocol):
    """A stage whose slow part (a model call) can start on the next batch
    while the runtime finishes the current one (infra/kafka/lookahead.py).

    prefetch only warms the stage's memory: it writes nothing and decides
    nothing, as its batch may never be handled (a stop, a rebalance), and
    handle() must give the same result without it. It runs on another thread
    while handle() runs on the previous batch, and never for two batches at
    once."""

    def prefetch(self, events: Sequence[Event]) -> None: ...


@dataclass(frozen=True)
class StageConfig:
    """The knobs stages read; the composition root fills them from settings."""

    inline_text_bytes: int = 256 * 1024
    segments_per_event: int = 32
    embed_max_segments: int = 256
    max_segments_per_document: int = 10_000


class StageDeps(Protocol):
    """What the pipeline table needs to build any stage. The composition root
    implements it lazily: a split worker never opens Milvus or loads the model."""

    @property
    def uow(self) -> UnitOfWorkFactory: ...

    @property
    def reader(self) -> DocumentReader: ...

    @property
    def tokens(self) -> ModelTokens: ...

    @property
    def embedder(self) -> EmbeddingProvider: ...

    @property
    def model_identity(self) -> tuple[str, str, int]:
        """(provider, model, dim) without loading the model."""
        ...

    @property
    def vectors(self) -> VectorIndex: ...

    @property
    def keyword_index(self) -> KeywordIndex: ...

    @property
    def stage_config(self) -> StageConfig: ...
