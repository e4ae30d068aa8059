"""The loop every stage runs in: consume a batch, decode, handle, publish what
the stage emits, and only then commit offsets (at-least-once; the stages are
idempotent). One error policy for all stages:

* a message that does not decode (bad JSON, unknown schema_version, invalid
  payload) is dead-lettered at once; the rest of the batch goes on;
* TransientError (database, Milvus, broker or model provider unavailable)
  retries the batch with capped exponential backoff and jitter, for as long as
  it takes, with the partitions paused so the consumer stays in its group;
* any other error isolates the failing event (the batch is retried one event
  at a time), retries it a bounded number of times, then dead-letters it and
  marks its document as failed. No exception escapes the loop.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from confluent_kafka import (
    OFFSET_STORED,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from domain.errors import InvalidEvent, PermanentError, TransientError
from domain.events import Event, decode_event
from infra import metrics
from infra.kafka.producer import EventPublisher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Emit:
    topic: str
    event: Event


class Stage(Protocol):
    name: str
    input_topics: list[str]
    max_batch: int

    def handle(self, events: Sequence[Event]) -> list[Emit]:
        """Do the stage's durable side effects for these events and return the
        events to publish next. Must be idempotent: it may see them again."""
        ...

    def on_dead_letter(self, event: Event, reason: str) -> None:
        """The event is given up on: record it on the document's status."""
        ...


class RejectsEvents:
    """Mixin for stages: ``reject(event, error)`` marks one event of a batch as
    permanently failed (the stage has already recorded it on the document) while
    the rest of the batch succeeds. The runner dead-letters each rejected event
    after publishing the batch's output."""

    def reject(self, event: Event, error: Exception) -> None:
        self.__dict__.setdefault("_rejected", []).append((event, error))

    def drain_rejected(self) -> list[tuple[Event, Exception]]:
        rejected: list[tuple[Event, Exception]] = self.__dict__.pop("_rejected", [])
        return rejected


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
    max_event_bytes: int = 1_000_000
    # Only for a broker this process owns (nobody else can join the group):
    # take every partition at once instead of waiting ~3 s for a group join.
    # Offsets are still committed to the group, so a later run resumes.
    exclusive: bool = False
    extra: dict[str, object] = field(default_factory=dict)


class StageRunner:
    def __init__(self, stage: Stage, config: RunnerConfig, publisher: EventPublisher) -> None:
        self.stage = stage
        self.config = config
        self.publisher = publisher
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.processed = 0
        self.dead_lettered = 0
        self._by_event: dict[int, Message] = {}
        self._consumer: Consumer | None = None

    # -- lifecycle ---------------------------------------------------------

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        c = self.config
        consumer = Consumer(
            {
                "bootstrap.servers": c.bootstrap,
                "group.id": c.group_id,
                "client.id": f"{c.group_id}-{threading.get_ident()}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": c.session_timeout_ms,
                "heartbeat.interval.ms": max(500, c.session_timeout_ms // 3),
                "max.poll.interval.ms": c.max_poll_interval_ms,
                **c.extra,
            },
            logger=logging.getLogger("rdkafka"),
        )
        self._consumer = consumer
        if c.exclusive:
            md = consumer.list_topics(timeout=15)
            parts = [
                TopicPartition(t, p, OFFSET_STORED)
                for t in self.stage.input_topics
                for p in sorted(md.topics[t].partitions)
            ]
            consumer.assign(parts)
            self._on_assign(consumer, parts)
        else:
            consumer.subscribe(self.stage.input_topics, on_assign=self._on_assign)
        log.info(
            "stage %s consuming %s as group %s",
            self.stage.name,
            self.stage.input_topics,
            c.group_id,
        )
        try:
            while not self.stop_event.is_set():
                msgs = consumer.consume(self.stage.max_batch, timeout=c.poll_timeout)
                if msgs:
                    self._process(consumer, msgs)
        finally:
            try:
                consumer.close()
            except Exception:  # closing a consumer whose broker is gone
                log.debug("consumer close failed", exc_info=True)
            self.publisher.close()
            log.info("stage %s stopped", self.stage.name)

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info(
            "stage %s assigned %s", self.stage.name, [(p.topic, p.partition) for p in partitions]
        )
        self.ready.set()

    # -- one batch ---------------------------------------------------------

    def _process(self, consumer: Consumer, msgs: list[Message]) -> None:
        started = time.perf_counter()
        good: list[tuple[Message, Event]] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("stage %s: consumer error %s", self.stage.name, err)
                continue
            if not self._meant_for_me(msg):
                continue
            size = len(msg.value() or b"")
            if size > self.config.max_event_bytes:
                too_big = InvalidEvent(
                    f"event of {size} bytes exceeds the limit of {self.config.max_event_bytes}"
                )
                self._dead_letter(msg, too_big, attempts=1, event=None)
                continue
            try:
                good.append((msg, decode_event(msg.value())))
            except InvalidEvent as exc:
                self._dead_letter(msg, exc, attempts=1, event=None)
            except Exception as exc:  # a decoder bug must not crash-loop the stage
                log.exception("stage %s: decoder failed unexpectedly", self.stage.name)
                self._dead_letter(msg, InvalidEvent(f"undecodable: {exc!r}"[:500]), 1, None)

        if good:
            self._by_event = {id(e): m for m, e in good}
            self._handle_with_policy(consumer, good)
            self._by_event = {}
        self._commit(consumer, msgs)
        self.processed += len(msgs)
        metrics.EVENTS.labels(self.stage.name).inc(len(msgs))
        metrics.BATCH_SECONDS.labels(self.stage.name).observe(time.perf_counter() - started)

    def _meant_for_me(self, msg: Message) -> bool:
        """A replayed dead letter goes back to its topic, which other groups
        read too; only the stage that dead-lettered it takes it."""
        for key, value in msg.headers() or []:
            if key == "kb-replay-for":
                return (value or b"").decode() == self.stage.name
        return True

    def _handle_with_policy(self, consumer: Consumer, items: list[tuple[Message, Event]]) -> None:
        try:
            self._handle_retrying_transient(consumer, [e for _, e in items])
            return
        except _Failed as failed:
            if len(items) == 1:
                msg, event = items[0]
                self._give_up(consumer, msg, event, failed)
                return
        # isolate the culprit: the rest of the batch must not suffer for it
        for msg, event in items:
            try:
                self._handle_retrying_transient(consumer, [event])
            except _Failed as failed:
                self._give_up(consumer, msg, event, failed)

    def _give_up(self, consumer: Consumer, msg: Message, event: Event, first: _Failed) -> None:
        """The event failed alone: retry a bounded number of times unless the
        error is permanent, then dead-letter it."""
        failure = first
        attempts = 1
        while (
            not isinstance(failure.cause, PermanentError) and attempts < self.config.retry_attempts
        ):
            self._backoff(consumer, attempts)
            attempts += 1
            try:
                self._handle_retrying_transient(consumer, [event])
                return
            except _Failed as again:
                failure = again
        self._dead_letter(msg, failure.cause, attempts=attempts, event=event)

    def _handle_retrying_transient(self, consumer: Consumer, events: list[Event]) -> None:
        attempt = 0
        while True:
            try:
                drain = getattr(self.stage, "drain_rejected", None)
                if drain:
                    drain()  # leftovers of an attempt that failed as a whole
                emits = self.stage.handle(events)
                for e in emits:
                    self.publisher.publish(e.topic, e.event)
                self.publisher.flush()
                for event, error in drain() if drain else []:
                    msg = self._by_event.get(id(event))
                    if msg is not None:
                        self._dead_letter(msg, error, attempts=1, event=None)
                return
            except TransientError as exc:
                attempt += 1
                metrics.RETRIES.labels(self.stage.name).inc()
                log.warning(
                    "stage %s: transient failure (attempt %d), retrying: %s",
                    self.stage.name,
                    attempt,
                    exc,
                )
                if self.stop_event.is_set():
                    raise _Stopping() from exc
                self._backoff(consumer, attempt)
            except Exception as exc:
                if isinstance(exc, PermanentError):
                    log.info("stage %s: permanent failure: %s", self.stage.name, exc)
                else:
                    log.error(
                        "stage %s: unexpected failure: %s", self.stage.name, exc, exc_info=True
                    )
                raise _Failed(exc) from exc

    def _backoff(self, consumer: Consumer, attempt: int) -> None:
        """Sleep with jitter while staying in the consumer group: pause the
        assignment and keep polling (paused partitions return nothing)."""
        delay = min(self.config.retry_max_seconds, 0.2 * 2 ** min(attempt, 10))
        delay = random.uniform(delay / 2, delay)
        assignment = consumer.assignment()
        if assignment:
            consumer.pause(assignment)
        slipped: dict[tuple[str, int], int] = {}
        try:
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not self.stop_event.is_set():
                for m in consumer.consume(
                    1, timeout=min(0.5, max(0.0, deadline - time.monotonic()))
                ):
                    if m.error() is None:
                        tp = (m.topic(), m.partition())
                        slipped[tp] = min(slipped.get(tp, m.offset()), m.offset())
        finally:
            if assignment:
                consumer.resume(assignment)
            for (topic, partition), offset in slipped.items():
                # a prefetched message slipped through the pause: rewind so it is not skipped
                consumer.seek(TopicPartition(topic, partition, offset))
        if self.stop_event.is_set():
            raise _Stopping()

    def _dead_letter(
        self, msg: Message, exc: BaseException, attempts: int, event: Event | None
    ) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        log.warning(
            "stage %s: dead-lettering %s[%s]@%s: %s",
            self.stage.name,
            msg.topic(),
            msg.partition(),
            msg.offset(),
            reason,
        )
        headers = [
            ("kb-stage", self.stage.name.encode()),
            ("kb-error", reason[:2000].encode()),
            ("kb-error-class", type(exc).__name__.encode()),
            ("kb-original-topic", (msg.topic() or "").encode()),
            ("kb-original-partition", str(msg.partition()).encode()),
            ("kb-original-offset", str(msg.offset()).encode()),
            ("kb-attempts", str(attempts).encode()),
            ("kb-failed-at", datetime.now(UTC).isoformat().encode()),
            ("kb-trace", "".join(traceback.format_exception_only(exc)).strip()[:2000].encode()),
        ]
        while True:
            try:
                self.publisher.produce_raw(
                    self.config.dlq_topic, msg.value(), key=msg.key(), headers=headers
                )
                self.publisher.flush()
                break
            except TransientError as err:
                log.warning("dead-letter publish failed, retrying: %s", err)
                time.sleep(1)
                if self.stop_event.is_set():
                    raise _Stopping() from err
        self.dead_lettered += 1
        metrics.DEAD_LETTERS.labels(self.stage.name).inc()
        if event is not None:
            try:
                self.stage.on_dead_letter(event, str(exc))
            except Exception:  # status is best effort; the dead letter is the record
                log.exception("could not record failure on the document")

    def _commit(self, consumer: Consumer, msgs: list[Message]) -> None:
        offsets: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error() is None:
                tp = (m.topic(), m.partition())
                offsets[tp] = max(offsets.get(tp, -1), m.offset() + 1)
        if not offsets:
            return
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            # typically a rebalance took the partition: the new owner re-reads
            # from the last commit, and the stage is idempotent
            log.warning(
                "stage %s: commit failed (%s); events will be redelivered", self.stage.name, exc
            )


class _Failed(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Stopping(Exception):
    pass


def run_until_stopped(runner: StageRunner) -> None:
    try:
        runner.run()
    except _Stopping:
        log.info(
            "stage %s interrupted during retry; uncommitted events will be redelivered",
            runner.stage.name,
        )
