"""The durable delivery counter's port: "this message killed the worker N
times" must survive the worker, so the runner records each delivery in the
database (infra/db/deliveries.py) before handing a batch to its stage.

One record per (group, topic, partition): "the delivery starting at offset X
has begun K times". A new batch starting elsewhere overwrites it, so the
common path is one small write per batch and the table holds at most one row
per partition and group. K > 1 means the previous delivery of X neither
committed nor stopped cleanly: the worker died. The runner then handles the
batch one message at a time (each counted), so the message that kills it is
the one counted, and dead-letters it once it has died ``max_deliveries``
times (infra/kafka/runner.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from confluent_kafka import Message

from domain.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]


class DeliveryLog(Protocol):
    def attempt(
        self, group: str, offsets: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Record that delivery starts at ``offsets[tp]`` for each partition;
        return per partition how many times it has (this time included)."""
        ...

    def settled(self, group: str, offsets: Mapping[TopicPartition, int]) -> None:
        """The deliveries starting at these offsets ended without the worker
        dying (a clean stop, a commit lost to a rebalance): this delivery does
        not count. (A committed batch needs no call: the next one resets.)"""
        ...


class RepeatedCrash(PermanentError):
    """The worker died every time it handled this message."""

    def __init__(self, deaths: int) -> None:
        super().__init__(
            f"delivered {deaths} times without completing: the worker died handling it "
            "each time (crash, OOM kill?)"
        )
        self.deaths = deaths


class DeliveryCounter:
    """The runner's use of a DeliveryLog: count each delivery before it is
    handled, and forget one that ended without the worker dying. Without a
    log, or with a broken one, every delivery is the first."""

    def __init__(
        self, deliveries: DeliveryLog | None, group: str, wait: Callable[[int], None]
    ) -> None:
        self.deliveries = deliveries
        self.group = group
        self.wait = wait  # (attempt) -> None; may raise to stop
        self._counted: dict[TopicPartition, int] = {}

    def count(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        self._counted = offsets
        failures = 0
        while self.deliveries is not None and offsets:
            try:
                return self.deliveries.attempt(self.group, offsets)
            except TransientError as exc:
                failures += 1
                log.warning("%s: cannot count deliveries, retrying: %s", self.group, exc)
                self.wait(failures)
            except Exception:
                log.exception("%s: the delivery log failed; not counting", self.group)
                break
        return dict.fromkeys(offsets, 1)

    def settle(self) -> None:
        """The last delivery counted ended without dying: it does not count."""
        if self.deliveries is None or not self._counted:
            return
        try:
            self.deliveries.settled(self.group, self._counted)
        except Exception as exc:  # at worst, one delivery too many is counted
            log.warning("%s: could not settle deliveries: %s", self.group, exc)
        self._counted = {}


def topic_partition(msg: Message) -> TopicPartition:
    return (msg.topic() or "", msg.partition() or 0)


def first_offsets(msgs: Iterable[Message]) -> dict[TopicPartition, int]:
    firsts: dict[TopicPartition, int] = {}
    for m in msgs:
        if m.error() is None:
            firsts.setdefault(topic_partition(m), m.offset() or 0)
    return firsts
