"""An in-memory broker, source and sink: the batch processor and the stage
loop with no Kafka at all (like faust's ``test_context``). For unit tests of
the retry, dead-letter and delivery-counting policy, and for the processor
benchmark (benchmarks/processor.py); never a production runtime.

A MemoryBroker holds topics (lists of records per partition) and each
group's committed offsets; a MemorySource reads one group's partitions from
the committed offsets, as a consumer that has just joined does, so a "worker
that died" is a new source on the same broker. Waits return at once (a
backoff in a test costs nothing) unless ``stop`` is set.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from domain.events import Event, encode_event
from infra.kafka.source import Rebalance, Record, TopicPartition


@dataclass
class MemoryBroker:
    partitions: int = 1
    topics: dict[str, list[list[Record]]] = field(default_factory=dict)
    committed: dict[str, dict[TopicPartition, int]] = field(default_factory=dict)

    def log(self, topic: str) -> list[list[Record]]:
        if topic not in self.topics:
            self.topics[topic] = [[] for _ in range(self.partitions)]
        return self.topics[topic]

    def append(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> Record:
        parts = self.log(topic)
        if partition is None:
            partition = zlib.crc32(key or b"") % len(parts)
        record = Record(topic, partition, len(parts[partition]), key, value, tuple(headers))
        parts[partition].append(record)
        return record

    def publish(self, topic: str, event: Event, partition: int | None = None) -> Record:
        return self.append(topic, encode_event(event), event.key.encode(), partition=partition)

    def records(self, topic: str) -> list[Record]:
        return [r for p in self.log(topic) for r in p]

    def committed_offsets(self, group: str) -> dict[TopicPartition, int]:
        return dict(self.committed.get(group, {}))


class MemorySource:
    """One consumer of ``group`` holding every partition of ``inputs``.
    ``lose_commits``: partitions whose commits are discarded (as faust does
    for a partition revoked meanwhile); ``on_wait(seconds)`` runs at each
    backoff (a test may set stop there)."""

    def __init__(
        self,
        broker: MemoryBroker,
        group: str,
        inputs: Sequence[str],
        max_batch: int = 50,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.broker = broker
        self.group = group
        self.inputs = list(inputs)
        self.max_batch = max_batch
        self.on_wait = on_wait
        self.lose_commits: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.waits: list[float] = []
        self._listener: Rebalance | None = None
        self._position: dict[TopicPartition, int] = {}

    def assignment(self) -> list[TopicPartition]:
        return [(t, p) for t in self.inputs for p in range(len(self.broker.log(t)))]

    def open(self, listener: Rebalance) -> None:
        self._listener = listener
        self._assign()

    def _assign(self) -> None:
        committed = self.broker.committed.get(self.group, {})
        parts = self.assignment()
        self._position = {tp: committed.get(tp, 0) for tp in parts}
        if self._listener is not None:
            self._listener.assigned(parts)

    def rebalance(self) -> None:
        """Revoked and assigned again: read on from the committed offsets."""
        if self._listener is not None:
            self._listener.revoked(self.assignment())
        self._assign()

    def take(self, timeout: float, linger: float) -> list[Record]:
        out: list[Record] = []
        for (topic, partition), position in self._position.items():
            log = self.broker.log(topic)[partition]
            more = log[position : position + self.max_batch - len(out)]
            out.extend(more)
            self._position[(topic, partition)] = position + len(more)
            if len(out) >= self.max_batch:
                break
        return out

    def commit(self, offsets: Mapping[TopicPartition, int]) -> Collection[TopicPartition]:
        done = {tp: o for tp, o in offsets.items() if tp not in self.lose_commits}
        self.commits.append(dict(offsets))
        self.broker.committed.setdefault(self.group, {}).update(done)
        return done.keys()

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        self.waits.append(seconds)
        if self.on_wait is not None:
            self.on_wait(seconds)
        return not stop.is_set()

    def lag_view(self) -> None:
        return None

    def close(self) -> None:
        self._listener = None


class MemorySink:
    """Publishes into a MemoryBroker when flushed, as a producer's queue does.
    ``fail_flushes``: exceptions the next flushes raise, in turn (the queued
    messages are then dropped, as undelivered)."""

    def __init__(self, broker: MemoryBroker, max_event_bytes: int = 900_000) -> None:
        self.broker = broker
        self.max_event_bytes = max_event_bytes
        self.fail_flushes: list[Exception] = []
        self.flushes = 0
        self._queued: list[
            tuple[str, bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]
        ] = []

    def publish_batch(self, items: Iterable[tuple[str, Event]]) -> None:
        for topic, event in items:
            self._queued.append((topic, encode_event(event), event.key.encode(), ()))

    def produce_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self._queued.append((topic, value, key, tuple(headers or ())))

    def flush(self, timeout: float = 60.0) -> None:
        self.flushes += 1  # every call, so a test sees the ones made for nothing
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        if self.fail_flushes:
            raise self.fail_flushes.pop(0)
        for topic, value, key, headers in queued:
            self.broker.append(topic, value, key, headers)

    def close(self) -> None:
        self._queued = []


class MemoryDeliveryLog:
    """The delivery log's contract (infra/kafka/redelivery.DeliveryLog, kept
    durably by infra/db/deliveries.py) in a dict: survives a "worker" that is
    a new MemorySource and processor, not a process."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, TopicPartition], tuple[int, int]] = {}
        self.calls = 0

    def attempt(
        self, group: str, offsets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        self.calls += 1
        out: dict[TopicPartition, int] = {}
        for tp, offset in offsets.items():
            start, n = self.rows.get((group, tp), (offset, 0))
            n = n + 1 if start == offset else 1
            self.rows[(group, tp)] = (offset, n)
            out[tp] = n
        return out

    def settled(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        self.calls += 1
        for tp, offset in offsets.items():
            start, n = self.rows.get((group, tp), (-1, 0))
            if start != offset:
                continue
            if n <= 1:
                del self.rows[(group, tp)]
            else:
                self.rows[(group, tp)] = (start, n - 1)

    def pending(self, group: str) -> dict[TopicPartition, tuple[int, int]]:
        return {tp: row for (g, tp), row in self.rows.items() if g == group}
