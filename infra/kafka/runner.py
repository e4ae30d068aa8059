"""The loop every stage runs in:

    consume a batch -> decode (poison -> dead letter) -> handle under the retry
    policy -> publish the emits -> dead-letter the rejections -> commit

Offsets are committed only after the batch's output is on the broker
(at-least-once; stages are idempotent). What happens after a failure is
decided in infra/kafka/retry.py; waiting without leaving the consumer group
is infra/kafka/pausing.py; what a dead letter looks like is
infra/kafka/dead_letters.py. Every event given up on, rejected by the stage
or dead-lettered after retries, is reported to ``on_give_up`` (the lead wires
consumers.failures.FailureRecorder there), so its document ends in ``error``.

Each delivery is counted durably first (infra/kafka/redelivery.py), so a
message that keeps killing the worker ends as a dead letter. Fail points
(consumers/failpoints.py) let tests SIGKILL the worker at each boundary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_STORED, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as TP

from consumers.contract import Emit, Prefetches, Stage
from consumers.failpoints import failpoint
from domain.errors import InvalidEvent, TransientError
from domain.events import Event, decode_event
from infra import metrics
from infra.kafka import headers, observe
from infra.kafka.batching import take_batch
from infra.kafka.dead_letters import DeadLetterFailed, dead_letter, reason, send
from infra.kafka.lookahead import Lookahead
from infra.kafka.pausing import wait_paused
from infra.kafka.producer import EventPublisher
from infra.kafka.redelivery import (
    DeliveryCounter,
    DeliveryLog,
    RepeatedCrash,
    TopicPartition,
    first_offsets,
    topic_partition,
)
from infra.kafka.retry import Action, RetryPolicy
from infra.kafka.security import client_config
from infra.kafka.topics import Topics

log = logging.getLogger(__name__)

OnGiveUp = Callable[[str, Event, BaseException], object]
_Item = tuple[Message, Event]

# on_give_up failing for a reason that is not transient: tries before moving on
GIVE_UP_ATTEMPTS = 3


@dataclass
class RunnerConfig:
    bootstrap: str
    group_id: str
    dlq_topic: str
    session_timeout_ms: int = 6000
    max_poll_interval_ms: int = 600_000
    retry_attempts: int = 6
    retry_max_seconds: float = 30.0
    poll_timeout: float = 0.5
    # after the first message, wait this long for more to fill the batch
    linger: float = 0.0
    max_event_bytes: int = 1_000_000
    # with a delivery log: a message the worker died on this many times is dead-lettered
    max_deliveries: int = 5
    # Only for a broker this process owns (nobody else can join the group):
    # take every partition at once instead of waiting ~3 s for a group join.
    # Offsets are still committed to the group, so a later run resumes.
    exclusive: bool = False
    # a stage that can prefetch (the embedder) starts its model on the next
    # batch while the current one is written, published and committed
    lookahead: bool = False
    # How long the broker may hold a fetch that has nothing yet. The embedded
    # tansu broker does not answer a held fetch when a message arrives, so each
    # hop waited up to this long (~110 ms median at librdkafka's 500); Kafka
    # answers at once, and a lower value only adds requests while idle.
    fetch_wait_ms: int = 500
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(attempts=self.retry_attempts, cap=self.retry_max_seconds)


class _Stopping(Exception):
    """Stop was asked for while waiting to retry: leave without committing."""


class StageRunner:
    def __init__(
        self,
        stage: Stage,
        inputs: Sequence[str],
        topics: Topics,
        config: RunnerConfig,
        publisher: EventPublisher,
        on_give_up: OnGiveUp,
        deliveries: DeliveryLog | None = None,
    ) -> None:
        self.stage = stage
        self.inputs = list(inputs)  # physical topic names
        self.topics = topics
        self.config = config
        self.policy = config.retry
        self.publisher = publisher
        self.on_give_up = on_give_up
        self.counter = DeliveryCounter(deliveries, config.group_id, self._wait_before_retry)
        self._fp = {
            p: f"{stage.name}.{p}" for p in ("before_handle", "after_handle", "after_publish")
        }
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.processed = 0
        self.dead_lettered = 0
        self._consumer: Consumer | None = None
        self._ahead = (
            Lookahead(stage, stage.name, self._decode_quietly)
            if config.lookahead and isinstance(stage, Prefetches)
            else None
        )
        self.observer = observe.LoopObserver(stage.name, config.group_id, self.ready)

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        observe.bind_stage(self.stage.name)
        consumer = self._connect()
        try:
            while not self.stop_event.is_set():
                msgs = self._next_batch()
                if msgs:
                    self._process(msgs)
                self.observer.tick(consumer)
        finally:
            if self._ahead is not None:
                self._ahead.close()
            self.observer.close()
            try:
                consumer.close()
            except Exception:  # closing a consumer whose broker is gone
                log.debug("consumer close failed", exc_info=True)
            self.publisher.close()
            log.info("stage %s stopped", self.stage.name)

    def _take(self, timeout: float, linger: float) -> list[Message]:
        assert self._consumer is not None
        return take_batch(self._consumer, self.stage.max_batch, timeout, linger)

    def _next_batch(self) -> list[Message]:
        if self._ahead is not None:
            return self._ahead.next_batch(self._take, self.config.poll_timeout, self.config.linger)
        return self._take(self.config.poll_timeout, self.config.linger)

    def _process(self, msgs: list[Message]) -> None:
        started = time.perf_counter()
        counts = self.counter.count(first_offsets(msgs))
        try:
            if all(n <= 1 for n in counts.values()):
                if self._ahead is not None:  # the model starts on the next batch meanwhile
                    self._ahead.take_next(self._take)
                self._process_batch(msgs)
            else:
                self._one_by_one(msgs, counts)
        except (_Stopping, DeadLetterFailed):
            self.counter.settle()  # leaving on purpose is not dying: do not count it
            raise
        finally:
            observe.bind_events(())
        self.processed += len(msgs)
        observe.batch_done(self.stage.name, len(msgs), started)

    def _process_batch(self, msgs: list[Message]) -> None:
        batch = self._decode(msgs)
        if batch:
            self._handle(batch)
            failpoint(self._fp["after_publish"])
        self._commit(msgs)

    def _one_by_one(self, msgs: list[Message], counts: dict[TopicPartition, int]) -> None:
        """A redelivery after a worker died mid-batch: one message at a time,
        each counted, so the message that kills the worker is the one counted,
        and is dead-lettered once it has done so max_deliveries times."""
        for msg in msgs:
            if msg.error() is not None:
                continue
            tp = topic_partition(msg)
            n = counts.pop(tp) if tp in counts else self.counter.count({tp: msg.offset() or 0})[tp]
            if n <= self.config.max_deliveries:
                self._process_batch([msg])
            else:
                self._dead_letter_crasher(msg, n - 1)
                self._commit([msg])

    def _dead_letter_crasher(self, msg: Message, deaths: int) -> None:
        if not self._meant_for_me(msg):
            return
        error = RepeatedCrash(deaths)
        self._dead_letter(msg, error, attempts=deaths)
        try:
            event = self._decode_one(msg)
        except InvalidEvent:
            return  # no document to record it on
        self._give_up(event, error)

    # -- consuming ---------------------------------------------------------------

    def _connect(self) -> Consumer:
        c = self.config
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
        log.info("stage %s consuming %s as group %s", self.stage.name, self.inputs, c.group_id)
        return consumer

    def _on_assign(self, _consumer: Consumer, partitions: list[TP]) -> None:
        log.info(
            "stage %s assigned %s", self.stage.name, [(p.topic, p.partition) for p in partitions]
        )
        self.ready.set()

    def _on_revoke(self, _consumer: Consumer, partitions: list[TP]) -> None:
        if self._ahead is not None:
            self._ahead.revoked([(p.topic, p.partition) for p in partitions])

    def _decode(self, msgs: list[Message]) -> list[_Item]:
        """The batch's events; what does not decode is dead-lettered at once."""
        out: list[_Item] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("stage %s: consumer error %s", self.stage.name, err)
                continue
            if not self._meant_for_me(msg):
                continue
            try:
                out.append((msg, self._decode_one(msg)))
            except InvalidEvent as exc:
                self._dead_letter(msg, exc, attempts=1)
        return out

    def _decode_quietly(self, msg: Message) -> Event | None:
        """For a look ahead: the event, or None where _decode will dead-letter
        or skip the message when the batch is handled."""
        if msg.error() is not None or not self._meant_for_me(msg):
            return None
        try:
            return self._decode_one(msg)
        except InvalidEvent:
            return None

    def _decode_one(self, msg: Message) -> Event:
        size = len(msg.value() or b"")
        if size > self.config.max_event_bytes:
            raise InvalidEvent(
                f"event of {size} bytes exceeds the limit of {self.config.max_event_bytes}"
            )
        try:
            return decode_event(msg.value())
        except InvalidEvent:
            raise
        except Exception as exc:  # a decoder bug must not crash-loop the stage
            log.exception("stage %s: decoder failed unexpectedly", self.stage.name)
            raise InvalidEvent(f"undecodable: {exc!r}"[:500]) from exc

    def _meant_for_me(self, msg: Message) -> bool:
        """A replayed dead letter goes back to its topic, which other groups
        read too; only the stage that dead-lettered it takes it."""
        target = headers.get(msg.headers(), headers.REPLAY_FOR)
        return target is None or target == self.stage.name

    # -- handling under the retry policy -----------------------------------------

    def _handle(self, batch: list[_Item]) -> None:
        failures = transient = 0  # only failures that are not transient count towards the bound
        while (error := self._try(batch)) is not None:
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
                msg, event = batch[0]
                self._dead_letter(msg, error, attempts=failures)
                self._give_up(event, error)
                return
            self._wait(self.policy.delay(attempt))

    def _try(self, batch: list[_Item]) -> Exception | None:
        observe.bind_events([e for _, e in batch])
        try:
            self._attempt(batch)
        except (_Stopping, DeadLetterFailed):  # past the policy, uncommitted
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
            msg = _message_of(rejection.event, batch)
            if msg is None:
                log.error(
                    "stage %s rejected an event it was not handed: %s",
                    self.stage.name,
                    rejection.event.event_id,
                )
            else:
                self._dead_letter(msg, rejection.error, attempts=1)
            self._give_up(rejection.event, rejection.error)
        observe.record_result(self.stage.name, [e for _, e in batch], result)

    def _publish(self, emits: Sequence[Emit]) -> None:
        try:
            self.publisher.publish_batch((self.topics.name(e.topic), e.event) for e in emits)
        finally:
            # also after a failed publish: what was queued must not surface in
            # the next flush (a dead letter's) as that one's error
            self.publisher.flush()

    def _wait_before_retry(self, attempt: int) -> None:
        self._wait(self.policy.delay(attempt))

    def _wait(self, seconds: float) -> None:
        """Back off while staying in the group; leave the loop on stop."""
        if self._consumer is not None:
            running = wait_paused(self._consumer, seconds, self.stop_event)
        else:
            running = not self.stop_event.wait(seconds)
        if not running:
            raise _Stopping()

    # -- giving up ---------------------------------------------------------------

    def _dead_letter(self, msg: Message, error: BaseException, attempts: int) -> None:
        log.warning(
            "stage %s: dead-lettering %s[%s]@%s: %s",
            self.stage.name,
            msg.topic(),
            msg.partition(),
            msg.offset(),
            reason(error),
        )
        letter = dead_letter(
            self.stage.name,
            topic=msg.topic() or "",
            partition=msg.partition() or 0,
            offset=msg.offset() or 0,
            key=msg.key(),
            value=msg.value(),
            error=error,
            attempts=attempts,
        )
        send(self.publisher, self.config.dlq_topic, letter, self._wait_before_retry)
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

    # -- committing --------------------------------------------------------------

    def _commit(self, msgs: list[Message]) -> None:
        offsets: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error() is None:
                tp = topic_partition(m)
                offsets[tp] = max(offsets.get(tp, -1), (m.offset() or 0) + 1)
        if not offsets or self._consumer is None:
            return
        try:
            self._consumer.commit(
                offsets=[TP(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:
            # typically a rebalance took the partition: the new owner re-reads
            # from the last commit, and the stage is idempotent
            log.warning(
                "stage %s: commit failed (%s); events will be redelivered", self.stage.name, exc
            )
            self.counter.settle()  # their redelivery is not a death


def _message_of(event: Event, batch: list[_Item]) -> Message | None:
    """The message an event came from: by identity, as the stage hands back
    the objects it was given; by event_id if it handed back a copy."""
    for msg, e in batch:
        if e is event:
            return msg
    return next((msg for msg, e in batch if e.event_id == event.event_id), None)


def run_until_stopped(runner: StageRunner) -> None:
    try:
        runner.run()
    except _Stopping:
        log.info(
            "stage %s interrupted during retry; uncommitted events will be redelivered",
            runner.stage.name,
        )
    except DeadLetterFailed as exc:
        log.critical("stage %s stopped: %s", runner.stage.name, exc)
        raise
    except Exception:
        if not runner.stop_event.is_set():
            raise
        # asked to stop while the broker went away (e.g. `up` losing it): not a crash
        log.info("stage %s failed while stopping", runner.stage.name, exc_info=True)
