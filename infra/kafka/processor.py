"""What a stage does with one batch, whatever consumed it:

    decode (poison -> dead letter) -> handle under the retry policy ->
    publish the emits -> dead-letter the rejections -> commit

Offsets are committed only after the batch's output is on the broker
(at-least-once; stages are idempotent). What happens after a failure is
decided in infra/kafka/retry.py; what a dead letter looks like is
infra/kafka/dead_letters.py. Every event given up on, rejected by the stage
or dead-lettered after retries, is reported to ``on_give_up`` (the
composition root wires consumers.failures.FailureRecorder there), so its
document ends in ``error``.

Deliveries that may be redeliveries are counted durably first
(infra/kafka/redelivery.py), so a message that keeps killing the worker ends
as a dead letter; the happy path writes nothing there. Fail points
(consumers/failpoints.py) let tests SIGKILL the worker at each boundary.

Transport-free: records come from, and offsets go back to, a Source
(infra/kafka/source.py: confluent, faust or memory), and emits leave through
a Sink. No client library is imported here (tests/unit/test_processor.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from consumers.contract import Emit, Prefetches, Stage
from consumers.failpoints import failpoint
from domain.errors import InvalidEvent, TransientError
from domain.events import Event, decode_event
from infra import metrics
from infra.kafka import headers, observe
from infra.kafka.dead_letters import DeadLetterFailed, dead_letter, reason, send
from infra.kafka.lookahead import Lookahead
from infra.kafka.redelivery import DeliveryCounter, DeliveryLog, RepeatedCrash
from infra.kafka.retry import Action, RetryPolicy
from infra.kafka.source import Rebalance, Record, Sink, Source, TopicPartition, next_offsets
from infra.kafka.topics import Topics

log = logging.getLogger(__name__)

OnGiveUp = Callable[[str, Event, BaseException], object]
_Item = tuple[Record, Event]

# on_give_up failing for a reason that is not transient: tries before moving on
GIVE_UP_ATTEMPTS = 3


class Stopping(Exception):
    """Stop was asked for while waiting to retry: leave without committing."""


class BatchProcessor(Rebalance):
    def __init__(
        self,
        stage: Stage,
        topics: Topics,
        source: Source,
        sink: Sink,
        on_give_up: OnGiveUp,
        *,
        dlq_topic: str,
        group_id: str,
        policy: RetryPolicy,
        stop: threading.Event,
        max_event_bytes: int = 1_000_000,
        max_deliveries: int = 5,
        lookahead: bool = False,
        deliveries: DeliveryLog | None = None,
    ) -> None:
        self.stage = stage
        self.topics = topics
        self.source = source
        self.sink = sink
        self.on_give_up = on_give_up
        self.dlq_topic = dlq_topic
        self.policy = policy
        self.stop_event = stop
        self.max_event_bytes = max_event_bytes
        self.max_deliveries = max_deliveries
        self.counter = DeliveryCounter(deliveries, group_id, self._wait_before_retry)
        self._fp = {
            p: f"{stage.name}.{p}" for p in ("before_handle", "after_handle", "after_publish")
        }
        self.processed = 0
        self.dead_lettered = 0
        self._ahead = (
            Lookahead(stage, stage.name, self._decode_quietly)
            if lookahead and isinstance(stage, Prefetches)
            else None
        )

    # -- the source's rebalances ---------------------------------------------------

    def assigned(self, partitions: Sequence[TopicPartition]) -> None:
        self.counter.reassigned(partitions)

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        self.counter.reassigned(partitions)
        if self._ahead is not None:
            self._ahead.revoked(partitions)

    # -- batches -------------------------------------------------------------------

    def next_batch(self, poll_timeout: float, linger: float) -> list[Record]:
        if self._ahead is not None:
            return self._ahead.next_batch(self.source.take, poll_timeout, linger)
        return self.source.take(poll_timeout, linger)

    def process(self, records: list[Record]) -> None:
        started = time.perf_counter()
        counts = self.counter.begin(records)
        try:
            if all(n <= 1 for n in counts.values()):
                if self._ahead is not None:  # the model starts on the next batch meanwhile
                    self._ahead.take_next(self.source.take)
                self._process_batch(records)
            else:
                self._one_by_one(records, counts)
        except (Stopping, DeadLetterFailed):
            self.counter.settle()  # leaving on purpose is not dying: do not count it
            raise
        finally:
            observe.bind_events(())
        self.processed += len(records)
        observe.batch_done(self.stage.name, len(records), started)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()

    def _process_batch(self, records: list[Record]) -> None:
        batch = self._decode(records)
        if batch:
            self._handle(batch)
            failpoint(self._fp["after_publish"])
        self._commit(records)

    def _one_by_one(self, records: list[Record], counts: dict[TopicPartition, int]) -> None:
        """A redelivery after a worker died mid-batch: one message at a time,
        each counted, so the message that kills the worker is the one counted,
        and is dead-lettered once it has done so max_deliveries times."""
        for record in records:
            tp = record.tp
            n = counts.pop(tp) if tp in counts else self.counter.count({tp: record.offset})[tp]
            if n <= self.max_deliveries:
                self._process_batch([record])
            else:
                self._dead_letter_crasher(record, n - 1)
                self._commit([record])

    def _dead_letter_crasher(self, record: Record, deaths: int) -> None:
        if not self._meant_for_me(record):
            return
        error = RepeatedCrash(deaths)
        self._dead_letter(record, error, attempts=deaths)
        try:
            event = self._decode_one(record)
        except InvalidEvent:
            return  # no document to record it on
        self._give_up(event, error)

    # -- decoding ------------------------------------------------------------------

    def _decode(self, records: list[Record]) -> list[_Item]:
        """The batch's events; what does not decode is dead-lettered at once."""
        out: list[_Item] = []
        for record in records:
            if not self._meant_for_me(record):
                continue
            try:
                out.append((record, self._decode_one(record)))
            except InvalidEvent as exc:
                self._dead_letter(record, exc, attempts=1)
        return out

    def _decode_quietly(self, record: Record) -> Event | None:
        """For a look ahead: the event, or None where _decode will dead-letter
        or skip the record when the batch is handled."""
        if not self._meant_for_me(record):
            return None
        try:
            return self._decode_one(record)
        except InvalidEvent:
            return None

    def _decode_one(self, record: Record) -> Event:
        size = len(record.value or b"")
        if size > self.max_event_bytes:
            raise InvalidEvent(f"event of {size} bytes exceeds the limit of {self.max_event_bytes}")
        try:
            return decode_event(record.value)
        except InvalidEvent:
            raise
        except Exception as exc:  # a decoder bug must not crash-loop the stage
            log.exception("stage %s: decoder failed unexpectedly", self.stage.name)
            raise InvalidEvent(f"undecodable: {exc!r}"[:500]) from exc

    def _meant_for_me(self, record: Record) -> bool:
        """A replayed dead letter goes back to its topic, which other groups
        read too; only the stage that dead-lettered it takes it."""
        if not record.headers:
            return True
        target = headers.get(record.headers, headers.REPLAY_FOR)
        return target is None or target == self.stage.name

    # -- handling under the retry policy -------------------------------------------

    def _handle(self, batch: list[_Item]) -> None:
        failures = transient = 0  # only failures that are not transient count towards the bound
        while (error := self._try(batch)) is not None:
            self.counter.failed()  # a death while this delivery is retried must count
            if isinstance(error, TransientError):
                transient += 1
                metrics.RETRIES.labels(self.stage.name).inc()
            else:
                failures += 1
            action = self.policy.decide(error, len(batch), failures)
            attempt = transient if isinstance(error, TransientError) else failures
            observe.log_failure(log, self.stage.name, error, action, attempt)
            if action is Action.ISOLATE:
                for item in batch:  # the rest of the batch must not suffer for one event
                    self._handle([item])
                return
            if action is Action.DEAD_LETTER:
                record, event = batch[0]
                self._dead_letter(record, error, attempts=failures)
                self._give_up(event, error)
                return
            self._wait(self.policy.delay(attempt))

    def _try(self, batch: list[_Item]) -> Exception | None:
        observe.bind_events([e for _, e in batch])
        try:
            self._attempt(batch)
        except (Stopping, DeadLetterFailed):  # past the policy, uncommitted
            raise
        except Exception as exc:
            return exc
        return None

    def _attempt(self, batch: list[_Item]) -> None:
        """One try: the stage handles the events, its emits are published,
        the events it rejects are dead-lettered and given up on."""
        failpoint(self._fp["before_handle"])
        result = self.stage.handle([e for _, e in batch])
        failpoint(self._fp["after_handle"])
        self._publish(result.emits)
        for rejection in result.rejected:
            record = _record_of(rejection.event, batch)
            if record is None:
                log.error(
                    "stage %s rejected an event it was not handed: %s",
                    self.stage.name,
                    rejection.event.event_id,
                )
            else:
                self._dead_letter(record, rejection.error, attempts=1)
            self._give_up(rejection.event, rejection.error)
        observe.record_result(self.stage.name, [e for _, e in batch], result)

    def _publish(self, emits: Sequence[Emit]) -> None:
        """The emits, on the broker when this returns: the one flush of a
        batch that emits, and none for one that does not."""
        if not emits:
            return
        try:
            self.sink.publish_batch((self.topics.name(e.topic), e.event) for e in emits)
        finally:
            # also after a failed publish: what was queued must not surface in
            # the next flush (a dead letter's) as that one's error
            self.sink.flush()

    def _wait_before_retry(self, attempt: int) -> None:
        self._wait(self.policy.delay(attempt))

    def _wait(self, seconds: float) -> None:
        """Back off while staying in the group; leave the loop on stop."""
        if not self.source.wait(seconds, self.stop_event):
            raise Stopping()

    # -- giving up -----------------------------------------------------------------

    def _dead_letter(self, record: Record, error: BaseException, attempts: int) -> None:
        log.warning(
            "stage %s: dead-lettering %s[%s]@%s: %s",
            self.stage.name,
            record.topic,
            record.partition,
            record.offset,
            reason(error),
        )
        letter = dead_letter(
            self.stage.name,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            error=error,
            attempts=attempts,
        )
        send(self.sink, self.dlq_topic, letter, self._wait_before_retry)
        self.dead_lettered += 1
        metrics.DEAD_LETTERS.labels(self.stage.name).inc()

    def _give_up(self, event: Event, error: BaseException) -> None:
        """Report the event to on_give_up (its document's status). A failure
        here must not vanish: transient ones retry until it works (the stage
        could not work meanwhile anyway), others a few times, loudly."""
        failures = 0
        while True:
            try:
                self.on_give_up(self.stage.name, event, error)
                return
            except Exception as exc:
                metrics.GIVE_UP_FAILURES.labels(self.stage.name).inc()
                failures += 1
                final = not isinstance(exc, TransientError) and failures >= GIVE_UP_ATTEMPTS
                log.error(
                    "stage %s: could not record the failure of %s v%s on its document "
                    "(try %d%s): %s",
                    self.stage.name,
                    event.doc_key,
                    event.version,
                    failures,
                    "; giving up, the dead letter is the only record" if final else ", retrying",
                    exc,
                    exc_info=exc,
                )
                if final:
                    return
                self._wait(self.policy.delay(failures))

    # -- committing ----------------------------------------------------------------

    def _commit(self, records: list[Record]) -> None:
        offsets = next_offsets(records)
        if not offsets:
            return
        committed = self.source.commit(offsets)
        lost = [tp for tp in offsets if tp not in committed]
        if lost:
            # a rebalance took the partitions (or the broker refused): their
            # next owner re-reads from the last commit, and the stage is
            # idempotent; that redelivery is not a death
            log.warning(
                "stage %s: offsets of %s not committed; those events will be redelivered",
                self.stage.name,
                sorted(lost),
            )
            self.counter.settle(lost)
        self.counter.committed(committed)


def _record_of(event: Event, batch: list[_Item]) -> Record | None:
    """The record an event came from: by identity, as the stage hands back
    the objects it was given; by event_id if it handed back a copy."""
    for record, e in batch:
        if e is event:
            return record
    return next((record for record, e in batch if e.event_id == event.event_id), None)
