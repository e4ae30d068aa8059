"""StageRunner against a real tansu broker: the error policy (dead-letter what
does not decode, retry transient failures, isolate and dead-letter what keeps
failing), at-least-once delivery across a stop and restart, and keyed output.

The stages here are toys defined in this file; the broker, the producer, the
consumer group and the offsets are the real thing."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from domain.errors import DocumentError, TransientError
from domain.events import DocumentCreated, DocumentParsed, Event, decode_event, encode_event
from infra.kafka.producer import EventPublisher
from infra.kafka.runner import Emit, RunnerConfig, StageRunner, run_until_stopped
from infra.kafka.topics import Topics, ensure_topics
from tests.polling import poll

pytestmark = pytest.mark.integration

DLQ_HEADERS = (
    "kb-stage",
    "kb-error",
    "kb-original-topic",
    "kb-original-partition",
    "kb-original-offset",
    "kb-attempts",
)


# --- helpers ------------------------------------------------------------------


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    return poll(pred, timeout, interval)


def created(doc: str, n: int = 0, dataset: str = "ds1", version: int | None = None) -> Event:
    kwargs = {} if version is None else {"version": version}
    return DocumentCreated(
        tenant_id="t1",
        dataset_id=dataset,
        document_id=doc,
        source=f"{doc}.txt",
        content=f"content of {doc} #{n}",
        **kwargs,
    )


def parsed_from(ev: Event) -> DocumentParsed:
    """What the toy stages emit: a deterministic child of the input event."""
    assert isinstance(ev, DocumentCreated)
    return DocumentParsed(
        event_id=f"{ev.event_id}-p",
        tenant_id=ev.tenant_id,
        dataset_id=ev.dataset_id,
        document_id=ev.document_id,
        version=ev.version,
        source=ev.source,
        text=ev.content,
        chars=len(ev.content or ""),
    )


def headers_of(msg: Message) -> dict[str, str]:
    return {k: (v or b"").decode() for k, v in (msg.headers() or [])}


def reader(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "enable.auto.commit": False,
        }
    )


def read_topic(
    bootstrap: str, topic: str, expect: int, timeout: float = 10.0, settle: float = 1.0
) -> list[Message]:
    """Every message of a topic from the beginning: wait until `expect` have
    arrived, then keep reading `settle` seconds more so duplicates show up."""
    c = reader(bootstrap, f"reader-{uuid.uuid4().hex[:8]}")
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            if settle_until is None and (len(out) >= expect or now >= deadline):
                settle_until = now + settle
            if settle_until is not None and now >= settle_until:
                break
            for m in c.consume(100, timeout=0.2):
                if m.error() is None:
                    out.append(m)
        return out
    finally:
        c.close()


def end_offsets(bootstrap: str, topic: str, expect: int) -> dict[int, int]:
    """Offset after the last message of each non-empty partition, by reading the
    topic: tansu's memory engine reports the high watermark as the last record
    batch's base offset + 1, so get_watermark_offsets cannot be trusted here."""
    out: dict[int, int] = {}
    for m in read_topic(bootstrap, topic, expect=expect, settle=0.3):
        out[m.partition()] = max(out.get(m.partition(), 0), m.offset() + 1)
    return out


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    c = reader(bootstrap, group)
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        tps = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def fresh_group_member_gets(bootstrap: str, group: str, topic: str, linger: float = 1.5) -> list:
    """Join `group` as a new member and return whatever it is given."""
    assigned = threading.Event()
    c = reader(bootstrap, group)
    got: list[Message] = []
    try:
        c.subscribe([topic], on_assign=lambda _c, _p: assigned.set())
        deadline = time.monotonic() + 12
        while not assigned.is_set() and time.monotonic() < deadline:
            got += [m for m in c.consume(10, timeout=0.2) if m.error() is None]
        assert assigned.is_set(), "fresh consumer never joined the group"
        until = time.monotonic() + linger
        while time.monotonic() < until:
            got += [m for m in c.consume(10, timeout=0.2) if m.error() is None]
        return got
    finally:
        c.close()


@dataclass
class ToyStage:
    """Records every event it is handed; emits one DocumentParsed per event.
    `fail` may raise to simulate the stage's failure modes."""

    name: str
    input_topics: list[str]
    out_topic: str
    max_batch: int = 50
    fail: Callable[[ToyStage, Sequence[Event]], None] | None = None
    delay: float = 0.0
    calls: list[list[str]] = field(default_factory=list)
    succeeded: list[str] = field(default_factory=list)
    dead: list[tuple[Event, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, events: Sequence[Event]) -> list[Emit]:
        with self.lock:
            self.calls.append([e.event_id for e in events])
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            self.fail(self, events)
        with self.lock:
            self.succeeded.extend(e.event_id for e in events)
        return [Emit(self.out_topic, parsed_from(e)) for e in events]

    def on_dead_letter(self, event: Event, reason: str) -> None:
        with self.lock:
            self.dead.append((event, reason))

    def handled_ids(self) -> list[str]:
        with self.lock:
            return list(self.succeeded)


def config(tansu: str, topics: Topics, **kw: object) -> RunnerConfig:
    base: dict[str, object] = {
        "bootstrap": tansu,
        "group_id": topics.prefix + "g",
        "dlq_topic": topics.dlq,
        "session_timeout_ms": 6000,
        "retry_attempts": 3,
        "retry_max_seconds": 0.5,
    }
    base.update(kw)
    return RunnerConfig(**base)  # type: ignore[arg-type]


@contextmanager
def running(stage: ToyStage, cfg: RunnerConfig) -> Iterator[tuple[StageRunner, threading.Thread]]:
    runner = StageRunner(stage, cfg, EventPublisher(cfg.bootstrap, client_id=stage.name))
    thread = threading.Thread(target=run_until_stopped, args=(runner,), daemon=True)
    thread.start()
    try:
        assert runner.ready.wait(15), "runner never got a partition assignment"
        yield runner, thread
    finally:
        runner.stop()
        thread.join(15)
        assert not thread.is_alive(), "runner did not stop within 15 s"


@pytest.fixture
def topics(tansu: str, topic_prefix: str) -> Topics:
    t = Topics(topic_prefix)
    ensure_topics(tansu, t, partitions=1)
    return t


@pytest.fixture
def publisher(tansu: str) -> Iterator[EventPublisher]:
    p = EventPublisher(tansu, client_id="test-upstream")
    yield p
    p.close()


# --- a. poison messages ---------------------------------------------------------


def _poison_values() -> dict[str, bytes | None]:
    good = json.loads(encode_event(created("doc-p")))

    def variant(**changes: object) -> bytes:
        obj = dict(good)
        for k, v in changes.items():
            if v is _DROP:
                obj.pop(k, None)
            else:
                obj[k] = v
        return _dumps(obj)

    return {
        "not-json": b"this is not json {",
        "json-array": b'[{"type": "document.created"}]',
        "json-string": b'"document.created"',
        "json-number": b"42",
        "json-null": b"null",
        "empty-value": None,
        "empty-bytes": b"",
        "unknown-type": variant(type="document.exploded"),
        "no-type": variant(type=_DROP),
        "schema-v99": variant(schema_version=99),
        "missing-dataset-id": variant(dataset_id=_DROP),
        "bad-field-types": variant(version="yesterday", source=12, occurred_at=[1]),
        "extra-field": variant(surprise="forbidden"),
        "bad-id-chars": variant(document_id="no spaces or ! allowed"),
        "content-and-uri": variant(uri="file:///tmp/x.txt"),
        "truncated-json": encode_event(created("doc-t"))[:-7],
        "huge-nonsense": b"\x1b[31m" + b"nonsense " * 30_000,
        "binary-junk": bytes(range(255, -1, -1)) * 4,
        # once bugs: these escaped decode_event as RecursionError / ValueError /
        # TypeError and killed the runner thread
        "deeply-nested": b"[" * 50_000 + b"]" * 50_000,
        "5000-digit-int": variant(version=_BigInt()),
        "unhashable-schema-version": variant(schema_version=[1]),
        "dict-schema-version": variant(schema_version={"v": 1}),
        "bool-schema-version": variant(schema_version=True),
        "invalid-utf8": b'{"type": "document.created", "source": "\xff\xfe"}',
    }


_DROP = object()


class _BigInt:
    """Serialises as a 5000-digit integer literal."""


def _dumps(obj: dict[str, object]) -> bytes:
    big = "9" * 5000
    text = json.dumps({k: ("__BIG__" if isinstance(v, _BigInt) else v) for k, v in obj.items()})
    return text.replace('"__BIG__"', big).encode()


def test_poison_messages_are_dead_lettered_once_and_valid_events_handled_once(
    tansu: str, topics: Topics, publisher: EventPublisher
) -> None:
    poison = _poison_values()
    valid = [created(f"doc-{i}", i) for i in range(len(poison) + 3)]
    order: list[tuple[str, bytes | None]] = []
    poisons = iter(poison.items())
    for ev in valid:
        publisher.publish(topics.lifecycle, ev)
        order.append((ev.event_id, None))
        nxt = next(poisons, None)
        if nxt is not None:
            publisher.produce_raw(topics.lifecycle, nxt[1], key=f"poison-{nxt[0]}".encode())
    publisher.flush()
    total = len(valid) + len(poison)

    stage = ToyStage("toy-poison", [topics.lifecycle], topics.parsed, max_batch=7)
    with running(stage, config(tansu, topics)) as (runner, thread):
        assert wait_for(
            lambda: (
                len(stage.handled_ids()) >= len(valid)
                and runner.dead_lettered >= len(poison)
                and runner.processed >= total
            ),
            15,
        ), f"handled {len(stage.handled_ids())}, dead-lettered {runner.dead_lettered}"
        assert thread.is_alive(), "a poison message killed the runner"
        dlq = read_topic(tansu, topics.dlq, expect=len(poison))
        assert thread.is_alive()

    # every valid event handled exactly once, nothing else handled
    assert Counter(stage.handled_ids()) == Counter(ev.event_id for ev in valid)
    assert stage.dead == [], "on_dead_letter is for events that decoded"

    # every poison message dead-lettered exactly once, byte for byte, with provenance
    inputs = {m.offset(): m for m in read_topic(tansu, topics.lifecycle, expect=total)}
    keys = Counter((m.key() or b"").decode() for m in dlq)
    assert keys == Counter(f"poison-{name}" for name in poison)
    for m in dlq:
        name = m.key().decode().removeprefix("poison-")
        h = headers_of(m)
        assert set(DLQ_HEADERS) <= set(h), f"{name}: headers {sorted(h)}"
        assert h["kb-stage"] == "toy-poison"
        assert h["kb-original-topic"] == topics.lifecycle
        assert h["kb-original-partition"] == "0"
        assert h["kb-attempts"] == "1"
        assert h["kb-error"].startswith("InvalidEvent"), f"{name}: {h['kb-error']}"
        original = inputs[int(h["kb-original-offset"])]
        assert original.key() == m.key(), f"{name}: kb-original-offset points elsewhere"
        assert m.value() == poison[name] == original.value()
    errors = {m.key().decode(): headers_of(m)["kb-error"] for m in dlq}
    assert "schema_version 99" in errors["poison-schema-v99"]
    assert "dataset_id" in errors["poison-missing-dataset-id"]
    assert "empty" in errors["poison-empty-value"]

    # and the runner committed past all of it
    assert committed_offsets(tansu, topics.prefix + "g", topics.lifecycle) == end_offsets(
        tansu, topics.lifecycle, total
    )


# --- b. transient failures retry ----------------------------------------------------


def test_transient_errors_are_retried_then_committed_without_dead_letters(
    tansu: str, topics: Topics, publisher: EventPublisher
) -> None:
    events = [created(f"doc-{i}", i) for i in range(5)]
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()

    failures = {"left": 2}

    def flaky(_stage: ToyStage, _events: Sequence[Event]) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise TransientError("database is restarting")

    stage = ToyStage("toy-flaky", [topics.lifecycle], topics.parsed, fail=flaky)
    group = topics.prefix + "g"
    with running(stage, config(tansu, topics)) as (runner, thread):
        assert wait_for(lambda: len(stage.handled_ids()) >= len(events), 15)
        assert wait_for(lambda: runner.processed >= len(events), 5)
        assert thread.is_alive()

    assert failures["left"] == 0
    assert len(stage.calls) >= 3, "two transient failures, then success"
    assert Counter(stage.handled_ids()) == Counter(e.event_id for e in events)
    assert runner.dead_lettered == 0
    assert stage.dead == []
    assert read_topic(tansu, topics.dlq, expect=0) == [], "nothing may be dead-lettered"
    out = read_topic(tansu, topics.parsed, expect=len(events))
    assert Counter(decode_event(m.value()).event_id for m in out) == Counter(
        parsed_from(e).event_id for e in events
    )
    # committed: the group is past every event, and a new member gets nothing
    assert committed_offsets(tansu, group, topics.lifecycle) == {0: len(events)}
    assert fresh_group_member_gets(tansu, group, topics.lifecycle) == []


# --- c. one bad event in a batch --------------------------------------------------------


def test_failing_event_is_isolated_and_dead_lettered_while_the_rest_of_the_batch_goes_on(
    tansu: str, topics: Topics, publisher: EventPublisher
) -> None:
    events = [created(f"doc-{i}", i) for i in range(6)]
    bad = events[3]
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()

    def picky(_stage: ToyStage, batch: Sequence[Event]) -> None:
        if any(e.event_id == bad.event_id for e in batch):
            raise ValueError(f"cannot digest {bad.document_id}")

    stage = ToyStage("toy-picky", [topics.lifecycle], topics.parsed, max_batch=10, fail=picky)
    with running(stage, config(tansu, topics)) as (runner, thread):
        assert wait_for(lambda: runner.dead_lettered >= 1 and runner.processed >= 6, 20)
        assert thread.is_alive()
        dlq = read_topic(tansu, topics.dlq, expect=1)
        out = read_topic(tansu, topics.parsed, expect=5)

    good = [e for e in events if e is not bad]
    assert any(len(c) > 1 and bad.event_id in c for c in stage.calls), (
        f"the bad event never arrived inside a batch: {stage.calls}"
    )
    # the others were emitted downstream, exactly once each
    assert Counter(decode_event(m.value()).event_id for m in out) == Counter(
        parsed_from(e).event_id for e in good
    )
    assert Counter(stage.handled_ids()) == Counter(e.event_id for e in good)
    # the bad one: retried, then dead-lettered once, and the stage was told
    attempts_on_bad = sum(bad.event_id in c for c in stage.calls)
    assert attempts_on_bad >= 3, stage.calls
    assert len(dlq) == 1
    assert decode_event(dlq[0].value()) == bad
    assert dlq[0].key() == bad.document_id.encode()
    h = headers_of(dlq[0])
    assert h["kb-attempts"] == "3"
    alone = sum(c == [bad.event_id] for c in stage.calls)
    assert alone == 3, f"kb-attempts must count the attempts made on the event alone: {stage.calls}"
    assert h["kb-error"].startswith("ValueError") and "cannot digest doc-3" in h["kb-error"]
    assert h["kb-original-offset"] == "3"
    assert [(e.event_id, "cannot digest doc-3" in r) for e, r in stage.dead] == [
        (bad.event_id, True)
    ]
    assert committed_offsets(tansu, topics.prefix + "g", topics.lifecycle) == {0: 6}


def test_permanent_error_is_dead_lettered_without_retrying(
    tansu: str, topics: Topics, publisher: EventPublisher
) -> None:
    ev = created("doc-corrupt")
    publisher.publish(topics.lifecycle, ev)
    publisher.flush()

    def corrupt(_stage: ToyStage, _events: Sequence[Event]) -> None:
        raise DocumentError("the PDF is encrypted; upload it without a password")

    stage = ToyStage("toy-permanent", [topics.lifecycle], topics.parsed, fail=corrupt)
    with running(stage, config(tansu, topics)) as (runner, _thread):
        assert wait_for(lambda: runner.dead_lettered >= 1, 15)
        dlq = read_topic(tansu, topics.dlq, expect=1, settle=0.3)

    assert [e.event_id for e, _ in stage.dead] == [ev.event_id]
    assert stage.dead[0][1] == "the PDF is encrypted; upload it without a password"
    assert len(dlq) == 1
    h = headers_of(dlq[0])
    assert h["kb-error-class"] == "DocumentError"
    assert stage.calls == [[ev.event_id]], "a permanent error must not be retried"
    assert h["kb-attempts"] == "1"


# --- d. at-least-once across a stop ---------------------------------------------------------


def test_no_event_is_lost_when_a_runner_is_stopped_midway(
    tansu: str, topic_prefix: str, publisher: EventPublisher
) -> None:
    topics = Topics(topic_prefix)
    ensure_topics(tansu, topics, partitions=3)
    events = [created(f"doc-{i % 7}", i) for i in range(60)]
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()
    cfg = config(tansu, topics)

    first = ToyStage("toy-first", [topics.lifecycle], topics.parsed, max_batch=4, delay=0.15)
    with running(first, cfg):
        assert wait_for(lambda: len(first.handled_ids()) >= 8, 15)
    # stopped mid-way: it did some, not all
    assert 8 <= len(first.handled_ids()) < len(events)

    second = ToyStage("toy-second", [topics.lifecycle], topics.parsed, max_batch=20)
    all_ids = {e.event_id for e in events}
    with running(second, cfg):
        assert wait_for(
            lambda: set(first.handled_ids()) | set(second.handled_ids()) >= all_ids, 15
        ), f"lost {len(all_ids - set(first.handled_ids()) - set(second.handled_ids()))} events"
    seen = Counter(first.handled_ids()) + Counter(second.handled_ids())
    assert set(seen) == all_ids
    assert committed_offsets(tansu, cfg.group_id, topics.lifecycle) == end_offsets(
        tansu, topics.lifecycle, len(events)
    )


def test_batch_interrupted_during_transient_retry_is_redelivered_after_restart(
    tansu: str, topics: Topics, publisher: EventPublisher
) -> None:
    events = [created(f"doc-{i}", i) for i in range(12)]
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()
    cfg = config(tansu, topics, retry_max_seconds=2.0)

    def down_after_two_batches(stage: ToyStage, _events: Sequence[Event]) -> None:
        if len(stage.calls) > 2:
            raise TransientError("milvus is down")

    first = ToyStage(
        "toy-down", [topics.lifecycle], topics.parsed, max_batch=4, fail=down_after_two_batches
    )
    with running(first, cfg):
        assert wait_for(lambda: len(first.calls) >= 4, 15), "never reached the retry loop"
    # the runner stopped while retrying: the failing batch was never committed
    assert len(first.handled_ids()) == 8
    committed = committed_offsets(tansu, cfg.group_id, topics.lifecycle)
    assert committed == {0: 8}, committed

    second = ToyStage("toy-up", [topics.lifecycle], topics.parsed, max_batch=50)
    with running(second, cfg):
        assert wait_for(lambda: len(second.handled_ids()) >= 4, 15)
        time.sleep(0.5)
    assert Counter(second.handled_ids()) == Counter(e.event_id for e in events[8:])
    assert set(first.handled_ids()) | set(second.handled_ids()) == {e.event_id for e in events}


# --- e. output keyed by document_id ------------------------------------------------------


def test_emitted_events_are_keyed_by_document_id_and_stay_in_order(
    tansu: str, topic_prefix: str, publisher: EventPublisher
) -> None:
    topics = Topics(topic_prefix)
    ensure_topics(tansu, topics, partitions=3)
    docs = [f"doc-{c}" for c in "abcdefgh"]
    events = [created(doc, n, version=n + 1) for n in range(4) for doc in docs]
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()

    stage = ToyStage("toy-keyed", [topics.lifecycle], topics.parsed, max_batch=5)
    with running(stage, config(tansu, topics)):
        assert wait_for(lambda: len(stage.handled_ids()) >= len(events), 15)
        out = read_topic(tansu, topics.parsed, expect=len(events))

    assert len(out) == len(events)
    partitions: dict[str, set[int]] = {}
    versions: dict[str, list[int]] = {}
    for m in out:
        ev = decode_event(m.value())
        assert isinstance(ev, DocumentParsed)
        assert m.key() == ev.document_id.encode()
        partitions.setdefault(ev.document_id, set()).add(m.partition())
        versions.setdefault(ev.document_id, []).append(ev.version)
    assert all(len(p) == 1 for p in partitions.values()), partitions
    assert len({next(iter(p)) for p in partitions.values()}) > 1, "keys should spread out"
    assert versions == {doc: [1, 2, 3, 4] for doc in docs}, "per-document order lost"
    assert Counter(decode_event(m.value()).event_id for m in out) == Counter(
        parsed_from(e).event_id for e in events
    )
