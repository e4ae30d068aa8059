"""Dead letters: list them, and replay them to their original topic after a fix.

Listing reads the whole DLQ topic without committing anything. Replay uses
its own consumer group (``<prefix>dlq-replay``) and commits after it has
republished, so each dead letter is replayed once. A dead letter whose body
was cut to fit the broker (kb-truncated) is not replayed: the cut bytes
would only be dead-lettered again; the full event is at its original
topic/partition/offset while that topic retains it."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from infra.kafka import headers as h
from infra.kafka.journal import JournalWriter
from infra.kafka.producer import EventPublisher
from infra.kafka.security import client_config
from infra.kafka.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class DeadLetter:
    partition: int
    offset: int
    key: str | None
    headers: dict[str, str]
    value: bytes | None

    @property
    def truncated(self) -> bool:
        return self.headers.get(h.TRUNCATED) == "true"

    def to_dict(self) -> dict[str, Any]:
        preview = None
        if self.value is not None:
            preview = self.value[:300].decode("utf-8", "replace")
        return {
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "stage": self.headers.get(h.STAGE),
            "error": self.headers.get(h.ERROR),
            "error_class": self.headers.get(h.ERROR_CLASS),
            "original_topic": self.headers.get(h.ORIGINAL_TOPIC),
            "original_partition": _int(self.headers.get(h.ORIGINAL_PARTITION)),
            "original_offset": _int(self.headers.get(h.ORIGINAL_OFFSET)),
            "attempts": _int(self.headers.get(h.ATTEMPTS)),
            "failed_at": self.headers.get(h.FAILED_AT),
            "truncated": self.truncated,
            "original_size": _int(self.headers.get(h.ORIGINAL_SIZE)),
            "original_sha256": self.headers.get(h.ORIGINAL_SHA256),
            "value_preview": preview,
        }


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _letter(m: Message) -> DeadLetter:
    headers = h.as_dict(m.headers())
    key = m.key().decode("utf-8", "replace") if m.key() else None
    return DeadLetter(m.partition(), m.offset(), key, headers, m.value())


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        client_config(
            bootstrap,
            **{
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
            },
        ),
        logger=logging.getLogger("rdkafka"),
    )


def _read_to_end(
    consumer: Consumer, topic: str, start_committed: bool, idle_seconds: float = 2.0
) -> list[Message]:
    """Everything from the start (or the group's committed offsets) until the
    topic has been quiet for ``idle_seconds``. Watermarks are only a lower
    bound: tansu's memory engine under-reports them."""
    md = consumer.list_topics(topic, timeout=15)
    partitions = sorted(md.topics[topic].partitions) if topic in md.topics else []
    if not partitions:
        return []
    committed = (
        {
            tp.partition: tp.offset
            for tp in consumer.committed([TopicPartition(topic, p) for p in partitions], 15)
        }
        if start_committed
        else {}
    )
    assignment = []
    for p in partitions:
        start = committed.get(p, -1)
        low, _high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
        assignment.append(TopicPartition(topic, p, low if start is None or start < 0 else start))
    consumer.assign(assignment)
    out: list[Message] = []
    quiet_since = time.monotonic()
    deadline = time.monotonic() + 300
    while time.monotonic() - quiet_since < idle_seconds and time.monotonic() < deadline:
        batch = [m for m in consumer.consume(500, timeout=0.5) if m.error() is None]
        if batch:
            out.extend(batch)
            quiet_since = time.monotonic()
    return out


def _replay_headers(m: Message, letter: DeadLetter) -> list[tuple[str, bytes]]:
    headers = [(h.REPLAYED_FROM, f"{m.partition()}:{m.offset()}".encode())]
    stage = letter.headers.get(h.STAGE)
    if stage:  # only the stage that gave up on it takes it back
        headers.append((h.REPLAY_FOR, stage.encode()))
    return headers


def list_dead_letters(bootstrap: str, topics: Topics) -> list[DeadLetter]:
    consumer = _consumer(bootstrap, f"{topics.prefix}dlq-list-{uuid.uuid4().hex[:8]}")
    try:
        return [_letter(m) for m in _read_to_end(consumer, topics.dlq, start_committed=False)]
    finally:
        consumer.close()


def replay_group(topics: Topics) -> str:
    """The group `dlq replay` commits as: what it replayed is done."""
    return f"{topics.prefix}dlq-replay"


def replay_dead_letters(
    bootstrap: str,
    topics: Topics,
    stage: str | None = None,
    dry_run: bool = False,
    journal: JournalWriter | None = None,
) -> list[DeadLetter]:
    """Republish dead letters not replayed before to their original topic.
    ``journal``: the embedded broker's; the broker journal keeps dead letters
    until this group has committed past them."""
    consumer = _consumer(bootstrap, replay_group(topics))
    publisher = EventPublisher(bootstrap, client_id="kbstream-dlq-replay", journal=journal)
    replayed: list[DeadLetter] = []
    try:
        msgs = _read_to_end(consumer, topics.dlq, start_committed=True)
        for m in msgs:
            letter = _letter(m)
            target = letter.headers.get(h.ORIGINAL_TOPIC)
            if stage and letter.headers.get(h.STAGE) != stage:
                continue
            if not target:
                log.warning(
                    "dead letter at %s:%s has no original topic; skipped", m.partition(), m.offset()
                )
                continue
            if letter.truncated:
                log.warning(
                    "dead letter at %s:%s was cut to fit the broker; not replayed (the full "
                    "event is at %s[%s]@%s)",
                    m.partition(),
                    m.offset(),
                    target,
                    letter.headers.get(h.ORIGINAL_PARTITION),
                    letter.headers.get(h.ORIGINAL_OFFSET),
                )
                continue
            if not dry_run:
                publisher.produce_raw(
                    target,
                    letter.value,
                    key=m.key(),
                    headers=_replay_headers(m, letter),
                )
            replayed.append(letter)
        if not dry_run:
            publisher.flush()
            if msgs and stage is None:
                offsets: dict[int, int] = {}
                for m in msgs:
                    offsets[m.partition()] = max(offsets.get(m.partition(), 0), m.offset() + 1)
                consumer.commit(
                    offsets=[TopicPartition(topics.dlq, p, o) for p, o in offsets.items()],
                    asynchronous=False,
                )
    finally:
        publisher.close()
        consumer.close()
    return replayed
