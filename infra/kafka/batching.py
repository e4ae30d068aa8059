"""Taking one batch from the consumer: as soon as the first message arrives,
then whatever else is already fetched, and, for a stage that gains from larger
batches (the embedder), more for at most ``linger`` seconds.

``Consumer.consume(n, timeout)`` alone waits until it has n messages or the
timeout passes, so a lone event waited the whole poll timeout at every stage:
with six stages that was most of a document's time from publish to search."""

from __future__ import annotations

import time
from typing import Protocol

from confluent_kafka import Message


class _Consumes(Protocol):
    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]: ...

    def poll(self, timeout: float = -1) -> Message | None: ...


def take_batch(
    consumer: _Consumes, max_batch: int, poll_timeout: float, linger: float = 0.0
) -> list[Message]:
    msgs = consumer.consume(max_batch, timeout=0)
    if not msgs:
        first = consumer.poll(poll_timeout)  # returns with the first message
        if first is None:
            return []
        msgs = [first]
    deadline = time.monotonic() + linger
    while len(msgs) < max_batch:
        remaining = deadline - time.monotonic()
        more = consumer.consume(max_batch - len(msgs), timeout=max(remaining, 0.0))
        msgs.extend(more)
        if remaining <= 0 or not more:
            break
    return msgs
