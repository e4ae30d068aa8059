"""Waiting out a backoff without leaving the consumer group.

Sleeping in the poll loop would exceed max.poll.interval.ms and get the
consumer kicked out (its partitions move, the batch is redelivered elsewhere
while we still retry it). Instead: pause the assignment and keep polling;
paused partitions return nothing, but the consumer stays a live member."""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import Consumer, KafkaException, TopicPartition

log = logging.getLogger(__name__)


def wait_paused(consumer: Consumer, seconds: float, stop: threading.Event) -> bool:
    """Wait ``seconds`` with the assignment paused. Returns False if ``stop``
    was set meanwhile. A message that slips through (prefetched before the
    pause, or from a partition assigned during the wait) is rewound to, so
    the next poll returns it again instead of skipping it."""
    assignment = consumer.assignment()
    if assignment:
        consumer.pause(assignment)
    slipped: dict[tuple[str, int], int] = {}
    try:
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for m in consumer.consume(1, timeout=min(0.5, left)):
                if m.error() is None:
                    tp = (m.topic(), m.partition())
                    slipped[tp] = min(slipped.get(tp, m.offset()), m.offset())
    finally:
        _resume(consumer, slipped)
    return not stop.is_set()


def _resume(consumer: Consumer, slipped: dict[tuple[str, int], int]) -> None:
    # a rebalance during the wait may have taken partitions: resume what is
    # ours now; whoever owns the others reads from the last commit
    try:
        current = consumer.assignment()
        if current:
            consumer.resume(current)
    except KafkaException as exc:
        log.info("resume after backoff: %s", exc)
    for (topic, partition), offset in slipped.items():
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            log.info("rewind %s[%d] to %d after backoff: %s", topic, partition, offset, exc)
