"""The durable delivery counter: "this message killed the worker N times"
must survive the worker, so some deliveries are recorded in the database
(infra/db/deliveries.py) before their batch is handled.

One record per (group, topic, partition): "the delivery starting at offset X
has begun K times". Counting a delivery that starts elsewhere overwrites it,
so the table holds at most one row per partition and group. K > 1 means an
earlier delivery of X neither committed nor stopped cleanly: the worker died.
The processor then handles the batch one message at a time (each counted), so
the message that kills it is the one counted, and dead-letters it once it has
died ``max_deliveries`` times (infra/kafka/processor.py).

Only deliveries that may be redeliveries are counted; the happy path writes
nothing. A partition is *trusted* once this worker has committed a batch of
it since it was (re)assigned: its next messages follow what this worker
itself just committed. A batch is counted on its untrusted partitions (the
first batch after an assignment, which starts where the last owner stopped),
and on all its partitions at its first failed attempt. A worker that dies on
a trusted partition without a failed attempt has committed there first, so
each uncounted death moves the committed offset forward, which it cannot do
past the message that kills: the deaths that are not counted are bounded,
and from then on every death is (docs/guarantees.md, "Why skipping the
count is safe")."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Protocol

from domain.errors import PermanentError, TransientError
from infra.kafka.source import Record, TopicPartition, first_offsets

log = logging.getLogger(__name__)


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
        not count. (A committed batch needs no call: the next count resets.)"""
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
    """The processor's use of a DeliveryLog: count the deliveries that may be
    redeliveries before they are handled, and forget one that ended without
    the worker dying. Without a log, or with a broken one, every delivery is
    the first.

    Rebalance notifications may come from another thread (faust's event
    loop); a commit trusts a partition only if no rebalance touched it since
    its batch began."""

    def __init__(
        self, deliveries: DeliveryLog | None, group: str, wait: Callable[[int], None]
    ) -> None:
        self.deliveries = deliveries
        self.group = group
        self.wait = wait  # (attempt) -> None; may raise to stop
        self._lock = threading.Lock()
        self._epoch: dict[TopicPartition, int] = {}  # bumped by every rebalance
        self._trusted: dict[TopicPartition, int] = {}  # -> the epoch it was trusted in
        self._began: dict[TopicPartition, int] = {}  # the current delivery: epochs
        self._starts: dict[TopicPartition, int] = {}  # ... and first offsets
        self._counted: dict[TopicPartition, int] = {}  # counted, not yet committed
        self.writes = 0  # delivery-log calls made (for tests and benchmarks)

    # -- rebalances --------------------------------------------------------------

    def reassigned(self, partitions: Iterable[TopicPartition]) -> None:
        """Assigned or revoked: the next batch of each starts where some owner
        left off, maybe one that died."""
        with self._lock:
            for tp in partitions:
                self._epoch[tp] = self._epoch.get(tp, 0) + 1
                self._trusted.pop(tp, None)

    def trusted(self, tp: TopicPartition) -> bool:
        with self._lock:
            return self._trusted.get(tp) == self._epoch.get(tp, 0)

    # -- one delivery ------------------------------------------------------------

    def begin(self, records: Sequence[Record]) -> dict[TopicPartition, int]:
        """A batch is about to be handled: count it on its untrusted
        partitions. Returns those counts (empty: nothing was written)."""
        starts = first_offsets(records)
        with self._lock:
            self._began = {tp: self._epoch.get(tp, 0) for tp in starts}
            untrusted = {
                tp: o for tp, o in starts.items() if self._trusted.get(tp) != self._began[tp]
            }
        self._starts = starts
        self._counted = {}
        return self.count(untrusted)

    def failed(self) -> None:
        """An attempt at the current delivery failed: count it where it was not,
        so a death while it is retried counts."""
        rest = {tp: o for tp, o in self._starts.items() if tp not in self._counted}
        self.count(rest)

    def count(self, offsets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        if not offsets:
            return {}
        self._counted.update(offsets)
        failures = 0
        while self.deliveries is not None:
            try:
                self.writes += 1
                return self.deliveries.attempt(self.group, offsets)
            except TransientError as exc:
                failures += 1
                log.warning("%s: cannot count deliveries, retrying: %s", self.group, exc)
                self.wait(failures)
            except Exception:
                log.exception("%s: the delivery log failed; not counting", self.group)
                break
        return dict.fromkeys(offsets, 1)

    def committed(self, partitions: Collection[TopicPartition]) -> None:
        """These partitions' offsets are committed: their deliveries are done,
        and the partitions trusted unless a rebalance came in between."""
        with self._lock:
            for tp in partitions:
                self._counted.pop(tp, None)
                self._starts.pop(tp, None)
                epoch = self._epoch.get(tp, 0)
                if self._began.get(tp) == epoch:
                    self._trusted[tp] = epoch

    def settle(self, partitions: Collection[TopicPartition] | None = None) -> None:
        """The deliveries counted (on ``partitions``, or all) ended without the
        worker dying: they do not count."""
        if partitions is None:
            settling, self._counted = self._counted, {}
        else:
            settling = {tp: o for tp, o in self._counted.items() if tp in partitions}
            for tp in settling:
                del self._counted[tp]
        if self.deliveries is None or not settling:
            return
        try:
            self.writes += 1
            self.deliveries.settled(self.group, settling)
        except Exception as exc:  # at worst, one delivery too many is counted
            log.warning("%s: could not settle deliveries: %s", self.group, exc)
