"""The stage loop under both runtimes, confluent and faust (every test runs
under both: the same batch processor over each source), against a real tansu broker: the error policy (dead-letter what
does not decode, retry transient failures, isolate and dead-letter what keeps
failing, dead-letter what the stage rejects), dead letters that fit however
large the event, on_give_up for every event given up on, at-least-once
delivery across a stop and restart, and keyed output.

The stages here are toys defined in this file; the broker, the producer, the
consumer group and the offsets are the real thing."""

from __future__ import annotations

import hashlib
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
from prometheus_client import REGISTRY

from consumers.contract import StageResult
from domain.errors import DocumentError, TransientError
from domain.events import (
    DocumentCreated,
    DocumentParsed,
    Event,
    Topic,
    decode_event,
    encode_event,
)
from infra.kafka import headers as h
from infra.kafka.processor import GIVE_UP_ATTEMPTS
from infra.kafka.producer import EventPublisher
from infra.kafka.runner import RunnerConfig, StageRunner, run_until_stopped
from infra.kafka.runtimes import RUNTIMES, stage_runner
from infra.kafka.topics import Topics, ensure_topics
from kbstream.dlq import list_dead_letters, replay_dead_letters
from tests.polling import poll

pytestmark = pytest.mark.integration

# the runtime every test here runs under: the same policy, the same expectations
_runtime = "confluent"


@pytest.fixture(autouse=True, params=sorted(RUNTIMES))
def runtime(request: pytest.FixtureRequest) -> Iterator[str]:
    global _runtime
    _runtime = request.param
    try:
        yield request.param
    finally:
        _runtime = "confluent"


DLQ_HEADERS = (
    h.STAGE,
    h.ERROR,
    h.ORIGINAL_TOPIC,
    h.ORIGINAL_PARTITION,
    h.ORIGINAL_OFFSET,
    h.ATTEMPTS,
)


# --- helpers ------------------------------------------------------------------


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    return poll(pred, timeout, interval)


def created(
    doc: str, n: int = 0, dataset: str = "ds1", version: int | None = None, content: str = ""
) -> DocumentCreated:
    kwargs = {"version": 1 if version is None else version}
    return DocumentCreated(
        tenant_id="t1",
        dataset_id=dataset,
        document_id=doc,
        source=f"{doc}.txt",
        content=content or f"content of {doc} #{n}",
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
    return h.as_dict(msg.headers())


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


@dataclass
class ToyStage:
    """Records every event it is handed; emits `emit_for(event)` on PARSED
    for each event it does not reject. `fail` may raise to simulate the
    stage's failure modes; `reject` returns the error to reject an event with."""

    name: str
    max_batch: int = 50
    fail: Callable[[ToyStage, Sequence[Event]], None] | None = None
    reject: Callable[[Event], Exception | None] | None = None
    emit_for: Callable[[Event], Event] = parsed_from
    delay: float = 0.0
    calls: list[list[str]] = field(default_factory=list)
    succeeded: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, events: Sequence[Event]) -> StageResult:
        with self.lock:
            self.calls.append([e.event_id for e in events])
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            self.fail(self, events)
        result = StageResult()
        done = []
        for e in events:
            error = self.reject(e) if self.reject else None
            if error is not None:
                result.reject(e, error)
            else:
                result.emit(Topic.PARSED, self.emit_for(e))
                result.count("toys")
                done.append(e.event_id)
        with self.lock:
            self.succeeded.extend(done)
        return result

    def handled_ids(self) -> list[str]:
        with self.lock:
            return list(self.succeeded)


@dataclass
class GiveUpLog:
    """on_give_up for the tests: records what it was told. `errors[event_id]`
    are raised first, one per call; event ids in `broken` always raise."""

    calls: list[tuple[str, str, str]] = field(default_factory=list)
    tries: Counter[str] = field(default_factory=Counter)
    errors: dict[str, list[Exception]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, stage: str, event: Event, error: BaseException) -> None:
        with self.lock:
            self.tries[event.event_id] += 1
            if event.event_id in self.broken:
                raise RuntimeError("the status table is gone")
            if self.errors.get(event.event_id):
                raise self.errors[event.event_id].pop(0)
            self.calls.append((stage, event.event_id, str(error)))

    def recorded(self) -> list[tuple[str, str, str]]:
        with self.lock:
            return list(self.calls)


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
def running(
    stage: ToyStage, cfg: RunnerConfig, give_up: GiveUpLog | None = None
) -> Iterator[tuple[StageRunner, threading.Thread]]:
    topics = Topics(cfg.dlq_topic.removesuffix(Topic.DLQ.value))
    runner = stage_runner(
        _runtime,
        stage,
        [topics.lifecycle],
        topics,
        cfg,
        EventPublisher(cfg.bootstrap, client_id=stage.name),
        on_give_up=give_up if give_up is not None else GiveUpLog(),
    )
    thread = threading.Thread(target=run_until_stopped, args=(runner,), daemon=True)
    thread.start()
    try:
        assert runner.ready.wait(15), "runner never got a partition assignment"
        yield runner, thread
    finally:
        runner.stop()
        thread.join(15)
        assert not thread.is_alive(), "runner did not stop within 15 s"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


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

    stage = ToyStage("toy-poison", max_batch=7)
    give_up = GiveUpLog()
    with running(stage, config(tansu, topics), give_up) as (runner, thread):
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
    assert give_up.recorded() == [], "on_give_up is for events that decoded"

    # every poison message dead-lettered exactly once, byte for byte, with provenance
    inputs = {m.offset(): m for m in read_topic(tansu, topics.lifecycle, expect=total)}
    keys = Counter((m.key() or b"").decode() for m in dlq)
    assert keys == Counter(f"poison-{name}" for name in poison)
    for m in dlq:
        name = m.key().decode().removeprefix("poison-")
        got = headers_of(m)
        assert set(DLQ_HEADERS) <= set(got), f"{name}: headers {sorted(got)}"
        assert got[h.STAGE] == "toy-poison"
        assert got[h.ORIGINAL_TOPIC] == topics.lifecycle
        assert got[h.ORIGINAL_PARTITION] == "0"
        assert got[h.ATTEMPTS] == "1"
        assert got[h.ERROR].startswith("InvalidEvent"), f"{name}: {got[h.ERROR]}"
        original = inputs[int(got[h.ORIGINAL_OFFSET])]
        assert original.key() == m.key(), f"{name}: kb-original-offset points elsewhere"
        assert m.value() == poison[name] == original.value()
    errors = {m.key().decode(): headers_of(m)[h.ERROR] for m in dlq}
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

    stage = ToyStage("toy-flaky", fail=flaky)
    group = topics.prefix + "g"
    with running(stage, config(tansu, topics)) as (runner, thread):
        assert wait_for(lambda: len(stage.handled_ids()) >= len(events), 15)
        assert wait_for(lambda: runner.processed >= len(events), 5)
        assert thread.is_alive()

    assert failures["left"] == 0
    assert len(stage.calls) >= 3, "two transient failures, then success"
    assert Counter(stage.handled_ids()) == Counter(e.event_id for e in events)
    assert runner.dead_lettered == 0
    assert read_topic(tansu, topics.dlq, expect=0) == [], "nothing may be dead-lettered"
    out = read_topic(tansu, topics.parsed, expect=len(events))
    assert Counter(decode_event(m.value()).event_id for m in out) == Counter(
        parsed_from(e).event_id for e in events
    )
    # committed: the group is past every event, and a new member gets nothing
    assert committed_offsets(tansu, group, topics.lifecycle) == {0: len(events)}
    # a new member of the same runtime (tansu keeps a group's protocol, so a
    # plain consumer cannot join a group faust used) is handed nothing
    later = ToyStage("toy-flaky")
    with running(later, config(tansu, topics)):
        time.sleep(1.5)
    assert later.handled_ids() == []


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

    stage = ToyStage("toy-picky", max_batch=10, fail=picky)
    give_up = GiveUpLog()
    with running(stage, config(tansu, topics), give_up) as (runner, thread):
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
    got = headers_of(dlq[0])
    assert got[h.ATTEMPTS] == "3"
    alone = sum(c == [bad.event_id] for c in stage.calls)
    assert alone == 3, f"kb-attempts must count the attempts made on the event alone: {stage.calls}"
    assert got[h.ERROR].startswith("ValueError") and "cannot digest doc-3" in got[h.ERROR]
    assert got[h.ORIGINAL_OFFSET] == "3"
    assert [(s, e, "cannot digest doc-3" in r) for s, e, r in give_up.recorded()] == [
        ("toy-picky", bad.event_id, True)
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

    stage = ToyStage("toy-permanent", fail=corrupt)
    give_up = GiveUpLog()
    with running(stage, config(tansu, topics), give_up) as (runner, _thread):
        assert wait_for(lambda: runner.dead_lettered >= 1, 15)
        dlq = read_topic(tansu, topics.dlq, expect=1, settle=0.3)

    assert give_up.recorded() == [
        ("toy-permanent", ev.event_id, "the PDF is encrypted; upload it without a password")
    ]
    assert len(dlq) == 1
    got = headers_of(dlq[0])
    assert got[h.ERROR_CLASS] == "DocumentError"
    assert stage.calls == [[ev.event_id]], "a permanent error must not be retried"
    assert got[h.ATTEMPTS] == "1"


# --- d. at-least-once across a stop ---------------------------------------------------------


def stopped_midway_then_finished(
    tansu: str,
    topic_prefix: str,
    publisher: EventPublisher,
    first: ToyStage,
    second: ToyStage,
    first_does: int,
    **cfg: object,
) -> list[Event]:
    """60 events on 3 partitions; `first` runs until it has handled `first_does`
    and is stopped, `second` takes over until every event was handled by one
    of them. Asserts that nothing was lost and every offset is committed."""
    topics = Topics(topic_prefix)
    ensure_topics(tansu, topics, partitions=3)
    events = [created(f"doc-{i % 7}", i) for i in range(60)]
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()
    config_ = config(tansu, topics, **cfg)

    with running(first, config_):
        assert wait_for(lambda: len(first.handled_ids()) >= first_does, 15)
    # stopped mid-way: it did some, not all
    assert first_does <= len(first.handled_ids()) < len(events)

    all_ids = {e.event_id for e in events}
    with running(second, config_):
        assert wait_for(
            lambda: set(first.handled_ids()) | set(second.handled_ids()) >= all_ids, 15
        ), f"lost {len(all_ids - set(first.handled_ids()) - set(second.handled_ids()))} events"
    seen = Counter(first.handled_ids()) + Counter(second.handled_ids())
    assert set(seen) == all_ids
    assert committed_offsets(tansu, config_.group_id, topics.lifecycle) == end_offsets(
        tansu, topics.lifecycle, len(events)
    )
    return events


def test_no_event_is_lost_when_a_runner_is_stopped_midway(
    tansu: str, topic_prefix: str, publisher: EventPublisher
) -> None:
    stopped_midway_then_finished(
        tansu,
        topic_prefix,
        publisher,
        ToyStage("toy-first", max_batch=4, delay=0.15),
        ToyStage("toy-second", max_batch=20),
        first_does=8,
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

    first = ToyStage("toy-down", max_batch=4, fail=down_after_two_batches)
    with running(first, cfg):
        assert wait_for(lambda: len(first.calls) >= 4, 15), "never reached the retry loop"
    # the runner stopped while retrying: the failing batch was never committed
    assert len(first.handled_ids()) == 8
    committed = committed_offsets(tansu, cfg.group_id, topics.lifecycle)
    assert committed == {0: 8}, committed

    second = ToyStage("toy-up", max_batch=50)
    with running(second, cfg):
        assert wait_for(lambda: len(second.handled_ids()) >= 4, 15)
        time.sleep(0.5)
    assert Counter(second.handled_ids()) == Counter(e.event_id for e in events[8:])
    assert set(first.handled_ids()) | set(second.handled_ids()) == {e.event_id for e in events}


@dataclass
class PrefetchingToy(ToyStage):
    """A ToyStage that can prefetch (consumers/contract.py: Prefetches), as
    the embedder does: it records what it was shown ahead, and when."""

    ahead: list[list[str]] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)  # ("ahead"|"handle", event_id)

    def prefetch(self, events: Sequence[Event]) -> None:
        time.sleep(self.delay)  # the model call
        with self.lock:
            self.ahead.append([e.event_id for e in events])
            self.log.extend(("ahead", e.event_id) for e in events)

    def handle(self, events: Sequence[Event]) -> StageResult:
        with self.lock:
            self.log.extend(("handle", e.event_id) for e in events)
        return super().handle(events)


def test_lookahead_prefetches_the_next_batch_and_a_stop_while_one_is_held_loses_nothing(
    tansu: str, topic_prefix: str, publisher: EventPublisher, runtime: str
) -> None:
    first = PrefetchingToy("toy-ahead", max_batch=4, delay=0.1)
    second = PrefetchingToy("toy-ahead-2", max_batch=20)
    # stopped with work left, maybe with a batch held
    stopped_midway_then_finished(
        tansu, topic_prefix, publisher, first, second, first_does=12, lookahead=True
    )
    if runtime == "faust":  # the agent takes its own batches: no lookahead there
        assert first.ahead == second.ahead == []
        return
    # every batch but a fresh one was prefetched before it was handled
    assert len(first.ahead) >= 2
    handled_at = {eid: i for i, (kind, eid) in enumerate(first.log) if kind == "handle"}
    for batch in first.ahead:
        for eid in batch:
            ahead_at = first.log.index(("ahead", eid))
            assert eid not in handled_at or ahead_at < handled_at[eid], eid


# --- e. output keyed by document_id ------------------------------------------------------


@pytest.mark.parametrize("exclusive", [False, True], ids=["group", "exclusive"])
def test_emitted_events_are_keyed_by_document_id_and_stay_in_order(
    tansu: str, topic_prefix: str, publisher: EventPublisher, exclusive: bool
) -> None:
    topics = Topics(topic_prefix)
    ensure_topics(tansu, topics, partitions=3)
    docs = [f"doc-{c}" for c in "abcdefgh"]
    events = [created(doc, n, version=n + 1) for n in range(4) for doc in docs]
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()

    stage = ToyStage("toy-keyed", max_batch=5)
    with running(stage, config(tansu, topics, exclusive=exclusive)):
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


# --- f. what the stage rejects ------------------------------------------------------------


def test_rejected_events_are_dead_lettered_and_given_up_on_while_the_rest_is_emitted(
    tansu: str, topics: Topics, publisher: EventPublisher
) -> None:
    events = [created(f"doc-{i}", i) for i in range(6)]
    rejected = {events[1].event_id, events[4].event_id}
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()

    def broken(ev: Event) -> Exception | None:
        if ev.event_id in rejected:
            return DocumentError(f"{ev.document_id} is broken")
        return None

    stage = ToyStage("toy-rejects", max_batch=10, reject=broken)
    give_up = GiveUpLog()
    work_before = metric("kbstream_stage_work_total", stage="toy-rejects", what="toys")
    with running(stage, config(tansu, topics), give_up) as (runner, thread):
        assert wait_for(lambda: runner.processed >= 6 and runner.dead_lettered >= 2, 15)
        assert thread.is_alive()
        dlq = read_topic(tansu, topics.dlq, expect=2)
        out = read_topic(tansu, topics.parsed, expect=4)

    # a rejection is not a failure: every event handed over exactly once
    assert Counter(i for c in stage.calls for i in c) == Counter(e.event_id for e in events)
    assert Counter(decode_event(m.value()).event_id for m in out) == Counter(
        parsed_from(e).event_id for e in events if e.event_id not in rejected
    )
    assert sorted(decode_event(m.value()).event_id for m in dlq) == sorted(rejected)
    for m in dlq:
        got = headers_of(m)
        ev = decode_event(m.value())
        assert got[h.ATTEMPTS] == "1" and got[h.ERROR_CLASS] == "DocumentError"
        assert got[h.ERROR] == f"DocumentError: {ev.document_id} is broken"
        assert got[h.ORIGINAL_OFFSET] == str(events.index(ev))
        assert h.TRUNCATED not in got
    assert sorted(give_up.recorded()) == sorted(
        ("toy-rejects", e.event_id, f"{e.document_id} is broken")
        for e in events
        if e.event_id in rejected
    )
    assert committed_offsets(tansu, topics.prefix + "g", topics.lifecycle) == {0: 6}
    # StageResult.counts are exported by the runtime
    assert metric("kbstream_stage_work_total", stage="toy-rejects", what="toys") == (
        work_before + 4
    )


# --- g. a dead letter always fits ---------------------------------------------------------


def test_events_near_the_broker_limit_are_dead_lettered_cut_to_fit_and_the_stage_goes_on(
    tansu: str, topics: Topics
) -> None:
    """Upstream may publish events up to the broker's limit (~1 MiB); the same
    bytes plus kb-* headers do not fit in a dead letter. Once, producing it
    raised KafkaException, the runner died without committing, forever."""
    upstream = EventPublisher(tansu, max_event_bytes=1_048_000, client_id="big-upstream")
    # invalid JSON of ~1,000,000 bytes, and a valid event the stage rejects
    poison = b'{"type": "document.created", "content": "' + b"x" * 1_000_000
    huge = created("doc-huge", content="y" * 990_000)
    good = created("doc-good")
    try:
        upstream.produce_raw(topics.lifecycle, poison, key=b"doc-poison")
        upstream.publish(topics.lifecycle, huge)
        upstream.publish(topics.lifecycle, good)
        upstream.flush(30)
    finally:
        upstream.close()
    huge_bytes = encode_event(huge)
    assert len(huge_bytes) > 990_000

    def too_big(ev: Event) -> Exception | None:
        return DocumentError("too big to index") if ev.document_id == "doc-huge" else None

    stage = ToyStage("toy-huge", reject=too_big)
    give_up = GiveUpLog()
    cfg = config(tansu, topics)
    with running(stage, cfg, give_up) as (runner, thread):
        assert wait_for(lambda: runner.processed >= 3, 20), "the runner is stuck"
        assert thread.is_alive(), "dead-lettering a large event killed the runner"
        assert stage.handled_ids() == [good.event_id]
        dlq = read_topic(tansu, topics.dlq, expect=2)
        out = read_topic(tansu, topics.parsed, expect=1)

    assert [decode_event(m.value()).event_id for m in out] == [parsed_from(good).event_id]
    assert committed_offsets(tansu, cfg.group_id, topics.lifecycle) == {0: 3}
    assert give_up.recorded() == [("toy-huge", huge.event_id, "too big to index")]
    letters = {m.key(): m for m in dlq}
    assert set(letters) == {b"doc-poison", b"doc-huge"} and len(dlq) == 2
    for key, original, error in (
        (b"doc-poison", poison, "InvalidEvent"),
        (b"doc-huge", huge_bytes, "DocumentError: too big to index"),
    ):
        m = letters[key]
        got = headers_of(m)
        assert got[h.TRUNCATED] == "true"
        assert got[h.ORIGINAL_SIZE] == str(len(original))
        assert got[h.ORIGINAL_SHA256] == hashlib.sha256(original).hexdigest()
        assert got[h.ERROR].startswith(error), "the reason survives the cut"
        assert got[h.STAGE] == "toy-huge" and got[h.ORIGINAL_TOPIC] == topics.lifecycle
        value = m.value() or b""
        assert original.startswith(value) and 800_000 < len(value) < 900_000

    # `kbstream dlq` shows them as cut, and does not replay bytes that can only fail again
    listed = {d.key: d.to_dict() for d in list_dead_letters(tansu, topics)}
    assert listed["doc-huge"]["truncated"] is True
    assert listed["doc-huge"]["original_size"] == len(huge_bytes)
    assert replay_dead_letters(tansu, topics) == []


# --- h. output that can never be published ------------------------------------------------


def test_an_emit_too_large_to_publish_dead_letters_its_input_instead_of_looping(
    tansu: str, topics: Topics, publisher: EventPublisher
) -> None:
    events = [created(f"doc-{i}", i) for i in range(4)]
    bloated = events[2]
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()

    def emit(ev: Event) -> Event:
        child = parsed_from(ev)
        if ev.event_id == bloated.event_id:  # above the publisher's 900,000 bytes
            return child.model_copy(update={"text": "z" * 950_000})
        return child

    stage = ToyStage("toy-bloat", max_batch=10, emit_for=emit)
    give_up = GiveUpLog()
    with running(stage, config(tansu, topics), give_up) as (runner, thread):
        assert wait_for(lambda: runner.processed >= 4 and runner.dead_lettered >= 1, 15)
        time.sleep(0.5)
        assert thread.is_alive()
        dlq = read_topic(tansu, topics.dlq, expect=1)
        out = read_topic(tansu, topics.parsed, expect=3)

    assert sum(c == [bloated.event_id] for c in stage.calls) == 1, (
        f"a permanent publish failure must not be retried: {stage.calls}"
    )
    assert [decode_event(m.value()) for m in dlq] == [bloated]
    got = headers_of(dlq[0])
    assert got[h.ERROR].startswith("EventTooLarge") and "950" in got[h.ERROR]
    assert got[h.ATTEMPTS] == "1"
    # the others went out once: the too-large one stopped the batch before any was sent
    assert Counter(decode_event(m.value()).event_id for m in out) == Counter(
        parsed_from(e).event_id for e in events if e is not bloated
    )
    assert [(s, e) for s, e, _ in give_up.recorded()] == [("toy-bloat", bloated.event_id)]
    assert committed_offsets(tansu, topics.prefix + "g", topics.lifecycle) == {0: 4}


# --- i. on_give_up failing ----------------------------------------------------------------


def test_a_failing_on_give_up_is_retried_counted_and_does_not_stop_the_stage(
    tansu: str, topics: Topics, publisher: EventPublisher
) -> None:
    flaky, broken, fine = created("doc-flaky"), created("doc-broken"), created("doc-fine")
    for ev in (flaky, broken, fine):
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()
    stage = ToyStage(
        "toy-give-up",
        reject=lambda ev: None if ev.event_id == fine.event_id else DocumentError("bad"),
    )
    give_up = GiveUpLog(
        errors={flaky.event_id: [TransientError("db restarting"), RuntimeError("oops")]},
        broken={broken.event_id},
    )
    failures_before = metric("kbstream_give_up_failures_total", stage="toy-give-up")
    with running(stage, config(tansu, topics), give_up) as (runner, thread):
        assert wait_for(lambda: runner.processed >= 3, 20)
        assert thread.is_alive()

    # retried until recorded; a recorder that keeps failing is tried a few times, then left
    assert give_up.recorded() == [("toy-give-up", flaky.event_id, "bad")]
    assert give_up.tries == Counter({flaky.event_id: 3, broken.event_id: GIVE_UP_ATTEMPTS})
    assert metric("kbstream_give_up_failures_total", stage="toy-give-up") == (
        failures_before + 2 + GIVE_UP_ATTEMPTS
    )
    assert stage.handled_ids() == [fine.event_id]
    assert committed_offsets(tansu, topics.prefix + "g", topics.lifecycle) == {0: 3}
    assert len(read_topic(tansu, topics.dlq, expect=2, settle=0.3)) == 2


# --- j. replayed dead letters ---------------------------------------------------------------


def test_a_replayed_dead_letter_is_taken_only_by_the_stage_it_is_replayed_for(
    tansu: str, topics: Topics, publisher: EventPublisher
) -> None:
    mine, theirs, plain = created("doc-mine"), created("doc-theirs"), created("doc-plain")
    for ev, target in ((mine, "toy-replay"), (theirs, "index_keywords"), (plain, None)):
        extra = [(h.REPLAY_FOR, target.encode())] if target else None
        publisher.produce_raw(
            topics.lifecycle, encode_event(ev), key=ev.key.encode(), headers=extra
        )
    publisher.flush()

    stage = ToyStage("toy-replay")
    with running(stage, config(tansu, topics)) as (runner, _thread):
        assert wait_for(lambda: runner.processed >= 3, 15)
    assert sorted(stage.handled_ids()) == sorted([mine.event_id, plain.event_id])
    assert committed_offsets(tansu, topics.prefix + "g", topics.lifecycle) == {0: 3}
