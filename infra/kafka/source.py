"""The seam between the batch processor (infra/kafka/processor.py) and the
client library that consumes and produces (confluent-kafka, faust; or memory,
in tests): what a consumed message is, what a source of batches does, and
what the processor publishes through.

Nothing here imports a client library: both runtimes speak the Kafka protocol,
so the words are Kafka's (topic, partition, offset, headers, commit), but a
source is one small object per transport (infra/kafka/runtimes.py picks it).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from domain.events import Event

TopicPartition = tuple[str, int]
Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed message, as every source hands it over."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)


def first_offsets(records: Iterable[Record]) -> dict[TopicPartition, int]:
    """Where the batch starts on each of its partitions."""
    firsts: dict[TopicPartition, int] = {}
    for r in records:
        firsts.setdefault(r.tp, r.offset)
    return firsts


def next_offsets(records: Iterable[Record]) -> dict[TopicPartition, int]:
    """What to commit for a batch: past its last record on each partition."""
    offsets: dict[TopicPartition, int] = {}
    for r in records:
        offsets[r.tp] = max(offsets.get(r.tp, -1), r.offset + 1)
    return offsets


class Rebalance(Protocol):
    """Told by a source when its assignment changes. A source calls it on
    whatever thread its client reports rebalances on."""

    def assigned(self, partitions: Sequence[TopicPartition]) -> None: ...

    def revoked(self, partitions: Sequence[TopicPartition]) -> None: ...


class Source(Protocol):
    """Batches of one consumer group's messages, one batch at a time.

    ``take`` returns as soon as it has the first record (or after
    ``timeout``), then whatever else is at hand, waiting at most ``linger``
    seconds more for a fuller batch; ``take(0, 0)`` takes only what is already
    fetched. ``commit`` returns the partitions whose offsets it committed: one
    revoked meanwhile, or a commit the broker refused, is left out and its
    records come again. ``wait`` backs off without leaving the group and
    returns False when ``stop`` was set meanwhile."""

    def open(self, listener: Rebalance) -> None: ...

    def take(self, timeout: float, linger: float) -> list[Record]: ...

    def commit(self, offsets: Mapping[TopicPartition, int]) -> Collection[TopicPartition]: ...

    def wait(self, seconds: float, stop: threading.Event) -> bool: ...

    def lag_view(self) -> Any:
        """What infra/kafka/observe.LoopObserver reads the lag from (or None)."""
        ...

    def close(self) -> None: ...


class Sink(Protocol):
    """What the processor publishes emits and dead letters through
    (infra/kafka/producer.EventPublisher). ``flush`` raises for anything the
    broker did not take; a sink whose queue is empty returns at once."""

    max_event_bytes: int

    def publish_batch(self, items: Iterable[tuple[str, Event]]) -> None: ...

    def produce_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None: ...

    def flush(self, timeout: float = 60.0) -> None: ...

    def close(self) -> None: ...
