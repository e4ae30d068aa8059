"""Starting the next batch's slow work while the current batch is finished.

A stage that calls a model spends most of a batch in that call, and the rest
in writes, publishing and the commit, during which the model would sit idle.
For a stage that can ``prefetch`` (consumers/contract.py: Prefetches), the
processor takes the next batch from what the source has already fetched once
the current batch is known to be no redelivery after a death
(infra/kafka/redelivery.py), and prefetches it on
a side thread while the current batch is handled, published and committed;
that batch is handled next, its model work done.

Prefetching decides nothing and writes nothing: it only warms the stage's
memory, and handle() gives the same result without it. So a prefetched batch
that is never handled (a stop, a revoked partition) loses nothing; its
messages are uncommitted and come again.

A rebalance can happen in any later consume call while a batch is held (the
take of the batch after it, or the polls of a retry's wait). Messages of a
partition revoked after the call that returned them are dropped: the
partition's next owner (maybe this consumer again) reads them from the
committed offset. Messages returned by the call during which the revocation
happened are kept, as the runner without lookahead keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from consumers.contract import Prefetches
from domain.events import Event
from infra.kafka.source import Record, TopicPartition

log = logging.getLogger(__name__)

# take(timeout, linger) -> a batch: the source's (infra/kafka/source.py)
Take = Callable[[float, float], list[Record]]
# the processor's decoding: the event a record carries for this stage, or None
Decode = Callable[[Record], Event | None]


class Lookahead:
    def __init__(self, stage: Prefetches, name: str, decode: Decode) -> None:
        self.stage = stage
        self.name = name
        self.decode = decode
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"stage-{name}-ahead")
        self._running: Future[None] | None = None
        self._held: list[Record] | None = None  # the next batch, taken and prefetching
        self._revoked: set[TopicPartition] = set()  # since the held batch was taken

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        """From the source's revoked notification (confluent: on_revoke, on_lost). A revocation
        during the consume call that takes a batch ahead happens before the
        batch is held: what that call returns is the new assignment's."""
        if self._held is not None:
            self._revoked.update(partitions)

    def next_batch(self, take: Take, poll_timeout: float, linger: float) -> list[Record]:
        """The batch to handle now: the one taken ahead, its prefetch done,
        or else a fresh one (which handle() embeds itself)."""
        held, self._held = self._held, None
        if held is None:
            return take(poll_timeout, linger)
        self._wait()
        return self._still_ours(held)

    def take_next(self, take: Take) -> None:
        """Take the next batch from what the consumer already has and start
        its prefetch. The processor calls this only once the current batch is
        known to be no redelivery after a death: after one, batches are handled
        one message at a time with nothing running beside them, so a message
        that kills the worker in the model is the one counted for it
        (infra/kafka/redelivery.py)."""
        after = take(0.0, 0.0)
        if after:
            self._held, self._revoked = after, set()
            self._running = self._pool.submit(self._prefetch, after)

    def close(self) -> None:
        self._wait()
        self._pool.shutdown(wait=True)

    def _wait(self) -> None:
        if self._running is not None:
            self._running.result()  # _prefetch never raises
            self._running = None

    def _still_ours(self, msgs: list[Record]) -> list[Record]:
        revoked, self._revoked = self._revoked, set()
        kept = [m for m in msgs if m.tp not in revoked]
        if len(kept) < len(msgs):
            log.info(
                "stage %s: dropped %d taken-ahead messages of revoked partitions; "
                "they are read again from the committed offset",
                self.name,
                len(msgs) - len(kept),
            )
        return kept

    def _prefetch(self, msgs: list[Record]) -> None:
        try:
            events = [e for e in map(self.decode, msgs) if e is not None]
            self.stage.prefetch(events)
        except Exception:  # handle() does the work itself and meets the error there
            log.debug("stage %s: prefetch failed", self.name, exc_info=True)
