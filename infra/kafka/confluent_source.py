"""The confluent-kafka runtime (the default, ``KBSTREAM_RUNTIME=confluent``):
a Source (infra/kafka/source.py) over one librdkafka consumer.

- ``take``: infra/kafka/batching.py (returns with the first message, then
  what is fetched, lingering for a fuller batch if asked); consumer errors are
  logged here and never reach the processor.
- ``commit``: synchronous, of exactly the offsets asked for. A commit the
  broker refuses (typically a rebalance took the partition) commits nothing.
- ``wait``: infra/kafka/pausing.py, the assignment paused and the consumer
  still polling, so a backoff never leaves the group.
- rebalances: on_assign, on_revoke and on_lost, which librdkafka runs inside
  the consume calls, on the loop's own thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping, Sequence

from confluent_kafka import OFFSET_STORED, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as TP

from infra.kafka.batching import take_batch
from infra.kafka.pausing import wait_paused
from infra.kafka.runner import RunnerConfig
from infra.kafka.security import client_config
from infra.kafka.source import Rebalance, Record, TopicPartition

log = logging.getLogger(__name__)


class ConfluentSource:
    def __init__(self, config: RunnerConfig, inputs: Sequence[str], max_batch: int) -> None:
        self.config = config
        self.inputs = list(inputs)  # physical topic names
        self.max_batch = max_batch
        self._consumer: Consumer | None = None
        self._listener: Rebalance | None = None

    def open(self, listener: Rebalance) -> None:
        c = self.config
        self._listener = listener
        consumer = Consumer(
            client_config(
                c.bootstrap,
                **{
                    "group.id": c.group_id,
                    "client.id": f"{c.group_id}-{threading.get_ident()}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": c.session_timeout_ms,
                    "heartbeat.interval.ms": max(500, c.session_timeout_ms // 3),
                    "max.poll.interval.ms": c.max_poll_interval_ms,
                    "fetch.wait.max.ms": c.fetch_wait_ms,
                    **c.extra,
                },
            ),
            logger=logging.getLogger("rdkafka"),
        )
        self._consumer = consumer
        if c.exclusive:
            md = consumer.list_topics(timeout=15)
            parts = [
                TP(t, p, OFFSET_STORED)
                for t in self.inputs
                for p in sorted(md.topics[t].partitions)
            ]
            consumer.assign(parts)
            self._on_assign(consumer, parts)
        else:
            consumer.subscribe(
                self.inputs,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )

    def _on_assign(self, _consumer: Consumer, partitions: list[TP]) -> None:
        if self._listener is not None:
            self._listener.assigned([(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, _consumer: Consumer, partitions: list[TP]) -> None:
        if self._listener is not None:
            self._listener.revoked([(p.topic, p.partition) for p in partitions])

    def take(self, timeout: float, linger: float) -> list[Record]:
        assert self._consumer is not None, "take before open"
        msgs = take_batch(self._consumer, self.max_batch, timeout, linger)
        return [r for r in map(_record, msgs) if r is not None]

    def commit(self, offsets: Mapping[TopicPartition, int]) -> Collection[TopicPartition]:
        if self._consumer is None or not offsets:
            return ()
        try:
            self._consumer.commit(
                offsets=[TP(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:
            log.warning("commit of %s failed: %s", sorted(offsets), exc)
            return ()
        return offsets.keys()

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        if self._consumer is None:
            return not stop.wait(seconds)
        return wait_paused(self._consumer, seconds, stop)

    def lag_view(self) -> Consumer | None:
        return self._consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


def _record(msg: Message) -> Record | None:
    err = msg.error()
    if err is not None:
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error %s", err)
        return None
    return Record(
        msg.topic() or "",
        msg.partition() or 0,
        msg.offset() or 0,
        msg.key(),
        msg.value(),
        msg.headers() or (),  # type: ignore[arg-type]
    )
