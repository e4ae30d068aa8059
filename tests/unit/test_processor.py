"""The batch processor (infra/kafka/processor.py) in memory: its retry,
dead-letter, commit and delivery-counting policy over the in-memory source and
sink (infra/kafka/memory.py), no broker, no database. The same policy on a
real broker, under both runtimes, is tests/integration/test_stage_runner.py;
SIGKILLed workers are tests/e2e/test_failpoints.py.

A worker's death is simulated by a BaseException the processor does not
catch: the batch ends uncommitted, and the next "worker" is a new source and
processor on the same broker and delivery log."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from consumers.contract import StageResult
from domain.errors import DocumentError, TransientError
from domain.events import DocumentCreated, DocumentParsed, Event, Topic, decode_event
from infra.kafka import headers as h
from infra.kafka.memory import MemoryBroker, MemoryDeliveryLog, MemorySink, MemorySource
from infra.kafka.processor import BatchProcessor, Stopping
from infra.kafka.retry import RetryPolicy
from infra.kafka.topics import Topics

REPO = Path(__file__).resolve().parents[2]
TOPICS = Topics("t.")
GROUP = "t.toy"


class Died(BaseException):
    """The worker dies: nothing in the processor catches it."""


def created(doc: str) -> DocumentCreated:
    return DocumentCreated(
        tenant_id="t1",
        dataset_id="ds",
        document_id=doc,
        version=1,
        source=f"{doc}.txt",
        content=f"content of {doc}",
    )


def parsed(ev: Event) -> DocumentParsed:
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


@dataclass
class Toy:
    """Emits a DocumentParsed per event; ``fail(batch)`` may raise first,
    ``reject(event)`` may return an error to reject the event with."""

    name: str = "toy"
    max_batch: int = 10
    fail: Callable[[Sequence[Event]], None] | None = None
    reject: Callable[[Event], Exception | None] | None = None
    emits: bool = True
    calls: list[list[str]] = field(default_factory=list)

    def handle(self, events: Sequence[Event]) -> StageResult:
        self.calls.append([e.document_id for e in events])
        if self.fail is not None:
            self.fail(events)
        result = StageResult()
        for e in events:
            error = self.reject(e) if self.reject else None
            if error is not None:
                result.reject(e, error)
            elif self.emits:
                result.emit(Topic.PARSED, parsed(e))
        return result


@dataclass
class World:
    """A broker, a delivery log and what was given up on, shared by workers."""

    broker: MemoryBroker = field(default_factory=lambda: MemoryBroker(partitions=1))
    deliveries: MemoryDeliveryLog = field(default_factory=MemoryDeliveryLog)
    given_up: list[tuple[str, str]] = field(default_factory=list)

    def give_up(self, stage: str, event: Event, error: BaseException) -> None:
        self.given_up.append((event.document_id, type(error).__name__))

    def publish(self, *docs: str) -> list[DocumentCreated]:
        events = [created(d) for d in docs]
        for e in events:
            self.broker.publish(TOPICS.lifecycle, e)
        return events

    def worker(self, stage: Toy, **kw: object) -> Worker:
        return Worker(self, stage, **kw)  # type: ignore[arg-type]

    def committed(self) -> int:
        return self.broker.committed_offsets(GROUP).get((TOPICS.lifecycle, 0), 0)

    def emitted(self) -> list[str]:
        return [decode_event(r.value).document_id for r in self.broker.records(TOPICS.parsed)]

    def letters(self) -> list[dict[str, str]]:
        return [
            {**h.as_dict(r.headers), "doc": (r.key or b"").decode()}
            for r in self.broker.records(TOPICS.dlq)
        ]


class Worker:
    def __init__(
        self,
        world: World,
        stage: Toy,
        max_deliveries: int = 2,
        attempts: int = 3,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.stop = threading.Event()
        self.source = MemorySource(
            world.broker, GROUP, [TOPICS.lifecycle], stage.max_batch, on_wait
        )
        self.sink = MemorySink(world.broker)
        self.processor = BatchProcessor(
            stage,
            TOPICS,
            self.source,
            self.sink,
            world.give_up,
            dlq_topic=TOPICS.dlq,
            group_id=GROUP,
            policy=RetryPolicy(attempts=attempts, base=0.01, cap=0.01),
            stop=self.stop,
            max_deliveries=max_deliveries,
            deliveries=world.deliveries,
        )
        self.source.open(self.processor)

    def drain(self) -> bool:
        """Handle batches until there are none (False) or the worker dies (True)."""
        try:
            while records := self.processor.next_batch(0.0, 0.0):
                self.processor.process(records)
        except Died:
            return True
        return False


# --- the retry and dead-letter policy ------------------------------------------------


def test_a_transient_error_is_retried_then_the_batch_succeeds_and_commits() -> None:
    world = World()
    world.publish("a", "b", "c")
    left = [2]

    def flaky(_batch: Sequence[Event]) -> None:
        if left[0]:
            left[0] -= 1
            raise TransientError("database restarting")

    stage = Toy(fail=flaky)
    w = world.worker(stage)
    assert not w.drain()
    assert stage.calls == [["a", "b", "c"]] * 3, "the same batch, retried whole"
    assert len(w.source.waits) == 2, "a backoff before each retry"
    assert world.emitted() == ["a", "b", "c"] and world.letters() == []
    assert world.committed() == 3


def test_a_permanent_error_is_dead_lettered_with_its_reason_and_the_consumer_goes_on() -> None:
    world = World()
    world.publish("bad")
    stage = Toy(fail=lambda _b: _raise(DocumentError("encrypted PDF")))
    w = world.worker(stage)
    assert not w.drain()
    (letter,) = world.letters()
    assert letter["doc"] == "bad"
    assert letter[h.ERROR] == "DocumentError: encrypted PDF"
    assert letter[h.ATTEMPTS] == "1" and letter[h.STAGE] == "toy"
    assert stage.calls == [["bad"]], "a permanent error is not retried"
    assert world.given_up == [("bad", "DocumentError")]
    # and the consumer goes on
    stage.fail = None
    world.publish("good")
    assert not w.drain()
    assert world.emitted() == ["good"] and world.committed() == 2


def test_poison_is_dead_lettered_at_decode_and_the_rest_is_handled() -> None:
    world = World()
    world.publish("a")
    world.broker.append(TOPICS.lifecycle, b"not json {", b"poison", partition=0)
    world.publish("b")
    stage = Toy()
    w = world.worker(stage)
    assert not w.drain()
    assert stage.calls == [["a", "b"]]
    (letter,) = world.letters()
    assert letter["doc"] == "poison" and letter[h.ERROR_CLASS] == "InvalidEvent"
    assert letter[h.ORIGINAL_OFFSET] == "1" and letter[h.ATTEMPTS] == "1"
    assert world.given_up == [], "no document to record it on"
    assert world.committed() == 3


def test_rejected_events_are_dead_lettered_and_given_up_on_while_the_rest_is_emitted() -> None:
    world = World()
    world.publish("a", "broken", "c")
    stage = Toy(reject=lambda e: DocumentError("no text") if e.document_id == "broken" else None)
    w = world.worker(stage)
    assert not w.drain()
    assert stage.calls == [["a", "broken", "c"]], "a rejection is no failure: handled once"
    assert world.emitted() == ["a", "c"]
    assert [(x["doc"], x[h.ERROR]) for x in world.letters()] == [
        ("broken", "DocumentError: no text")
    ]
    assert world.given_up == [("broken", "DocumentError")]
    assert world.committed() == 3


def test_a_batch_that_half_fails_is_handled_one_by_one_and_only_the_bad_event_is_lost() -> None:
    world = World()
    world.publish("a", "bad", "c")

    def picky(batch: Sequence[Event]) -> None:
        if any(e.document_id == "bad" for e in batch):
            raise ValueError("cannot digest")

    stage = Toy(fail=picky)
    w = world.worker(stage, attempts=3)
    assert not w.drain()
    assert stage.calls == [["a", "bad", "c"], ["a"], ["bad"], ["bad"], ["bad"], ["c"]]
    assert world.emitted() == ["a", "c"]
    (letter,) = world.letters()
    assert (letter["doc"], letter[h.ATTEMPTS]) == ("bad", "3")
    assert letter[h.ERROR].startswith("ValueError: cannot digest")
    assert world.given_up == [("bad", "ValueError")]
    assert world.committed() == 3


# --- commits ---------------------------------------------------------------------------


def test_offsets_are_committed_only_after_the_emits_are_on_the_broker() -> None:
    world = World()
    world.publish("a", "b")
    stage = Toy()
    w = world.worker(stage)
    w.sink.fail_flushes = [TransientError("broker away")]
    seen: list[tuple[int, list[str]]] = []
    commit = w.source.commit

    def watched(offsets: dict[tuple[str, int], int]) -> object:
        seen.append((len(w.source.commits), world.emitted()))
        return commit(offsets)

    w.source.commit = watched  # type: ignore[method-assign]
    assert not w.drain()
    assert stage.calls == [["a", "b"], ["a", "b"]], "the failed publish retried the batch"
    assert seen == [(0, ["a", "b"])], "one commit, with the emits already published"
    assert w.source.commits == [{(TOPICS.lifecycle, 0): 2}]


def test_a_stop_while_retrying_commits_nothing_unfinished_and_counts_no_death() -> None:
    world = World()
    world.publish("a", "b")
    stage = Toy(fail=lambda _b: _raise(TransientError("milvus down")))
    w = world.worker(stage, on_wait=lambda _s: w.stop.set())
    with pytest.raises(Stopping):
        w.drain()
    assert w.source.commits == [] and world.committed() == 0
    assert world.emitted() == [] and world.letters() == []
    assert world.deliveries.pending(GROUP) == {}, "a clean stop is not a death"
    # the next worker gets the whole batch again
    stage.fail = None
    assert not world.worker(stage).drain()
    assert world.emitted() == ["a", "b"] and world.committed() == 2


def test_a_batch_that_emits_nothing_is_not_flushed_and_one_that_emits_is_flushed_once() -> None:
    world = World()
    world.publish("a", "b")
    quiet = Toy(emits=False)
    w = world.worker(quiet)
    assert not w.drain()
    assert w.sink.flushes == 0 and world.committed() == 2
    world.publish("c", "d")
    loud = world.worker(Toy(max_batch=1))
    assert not loud.drain()
    assert loud.sink.flushes == 2, "one flush per batch"


# --- counting deliveries ----------------------------------------------------------------


def test_only_the_first_batch_after_an_assignment_is_counted() -> None:
    world = World()
    world.publish(*"abcdef")
    w = world.worker(Toy(max_batch=2))
    assert not w.drain()
    assert world.committed() == 6
    assert world.deliveries.calls == 1, "the happy path writes nothing after the first batch"
    assert world.deliveries.pending(GROUP) == {(TOPICS.lifecycle, 0): (0, 1)}
    # a rebalance: the next batch starts where some owner left off
    world.publish("g", "h")
    w.source.rebalance()
    assert not w.drain()
    assert world.deliveries.calls == 2
    assert world.deliveries.pending(GROUP) == {(TOPICS.lifecycle, 0): (6, 1)}


def test_a_failed_attempt_counts_the_delivery_before_it_is_retried() -> None:
    world = World()
    world.publish("a", "b")
    w = world.worker(Toy(max_batch=1))
    assert not w.drain()
    assert world.deliveries.calls == 1
    world.publish("c")
    left = [1]

    def once(_batch: Sequence[Event]) -> None:
        if left[0]:
            left[0] -= 1
            raise TransientError("db restarting")

    w.processor.stage.fail = once  # type: ignore[attr-defined]
    assert not w.drain()
    assert world.deliveries.calls == 2, "counted at the failure, once"
    assert world.deliveries.pending(GROUP) == {(TOPICS.lifecycle, 0): (2, 1)}


def test_a_lost_commit_is_settled_and_the_partition_counted_again() -> None:
    """faust discards the commit of a partition revoked meanwhile: that
    redelivery is a rebalance, not a death."""
    world = World()
    world.publish("a", "b")
    w = world.worker(Toy())
    w.source.lose_commits = {(TOPICS.lifecycle, 0)}
    assert not w.drain()
    assert world.committed() == 0
    assert world.deliveries.pending(GROUP) == {}, "settled"
    w.source.lose_commits = set()
    w.source.rebalance()
    assert not w.drain()
    assert world.committed() == 2 and world.emitted() == ["a", "b", "a", "b"]
    assert world.deliveries.pending(GROUP) == {(TOPICS.lifecycle, 0): (0, 1)}


def killer(doc: str) -> Callable[[Sequence[Event]], None]:
    def fail(batch: Sequence[Event]) -> None:
        if any(e.document_id == doc for e in batch):
            raise Died(doc)

    return fail


def restart_until_quiet(world: World, stage: Callable[[], Toy], limit: int = 20) -> int:
    """Workers, one after another, each until it dies or runs dry; the deaths."""
    for deaths in range(limit):
        if not world.worker(stage(), max_deliveries=2).drain():
            return deaths
    raise AssertionError(f"still dying after {limit} workers")


def test_a_message_that_kills_every_worker_is_dead_lettered_after_max_deliveries() -> None:
    world = World()
    world.publish("a", "crasher", "c")
    deaths = restart_until_quiet(world, lambda: Toy(fail=killer("crasher")))
    assert deaths == 3  # in the batch of three (counted), then twice alone
    (letter,) = world.letters()
    assert (letter["doc"], letter[h.ERROR_CLASS], letter[h.ATTEMPTS]) == (
        "crasher",
        "RepeatedCrash",
        "2",
    )
    assert world.given_up == [("crasher", "RepeatedCrash")]
    assert sorted(world.emitted()) == ["a", "c"] and world.committed() == 3


def test_a_message_that_kills_a_worker_on_a_trusted_partition_is_dead_lettered_too() -> None:
    """The first batches commit, so the partition is trusted and the batch
    with the crasher is not counted: its deaths are counted once no worker
    gets past a first batch (docs/guarantees.md)."""
    world = World()
    world.publish(*[f"d{i}" for i in range(6)], "crasher", "z")
    deaths = restart_until_quiet(world, lambda: Toy(max_batch=2, fail=killer("crasher")))
    # the first worker commits three batches and dies uncounted in the fourth;
    # the next two die counted at the crasher's offset, the last dead-letters it
    assert deaths == 3
    assert world.deliveries.pending(GROUP) == {(TOPICS.lifecycle, 0): (7, 1)}
    (letter,) = world.letters()
    assert (letter["doc"], letter[h.ERROR_CLASS]) == ("crasher", "RepeatedCrash")
    assert Counter(world.emitted()) == Counter([f"d{i}" for i in range(6)] + ["z"])
    assert world.committed() == 8


def test_the_processor_imports_no_kafka_client() -> None:
    code = (
        "import sys, infra.kafka.processor, infra.kafka.runner, infra.kafka.runtimes, "
        "infra.kafka.memory\n"
        "bad = {'confluent_kafka', 'faust', 'aiokafka'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def _raise(exc: Exception) -> None:
    raise exc
