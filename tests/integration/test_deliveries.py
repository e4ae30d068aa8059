"""The durable delivery counter: the SQL delivery log's contract on SQLite and
PostgreSQL, and the runner on the real tansu broker turning "this message
killed the worker N times" into a dead letter.

A test cannot SIGKILL itself, so a worker's death is simulated: the toy stage
raises a BaseException the runner does not catch, which ends the runner
without committing (what a dead process leaves behind); the next runner of
the same group re-reads. The real SIGKILL case is in tests/e2e/test_failpoints.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest
from sqlalchemy import func, select

from domain.errors import TransientError
from domain.events import DocumentCreated, Event, decode_event
from infra.db.database import Database
from infra.db.deliveries import D, SqlDeliveryLog
from infra.kafka import headers as h
from infra.kafka.producer import EventPublisher
from infra.kafka.runner import RunnerConfig, run_until_stopped
from infra.kafka.runtimes import stage_runner
from infra.kafka.topics import Topics
from kbstream.dlq import list_dead_letters
from tests.integration import test_stage_runner as toys
from tests.integration.test_stage_runner import (
    GiveUpLog,
    ToyStage,
    config,
    read_topic,
    wait_for,
)

pytestmark = pytest.mark.integration
topics = toys.topics  # fixtures
publisher = toys.publisher


def created(doc: str) -> DocumentCreated:
    return toys.created(doc, version=1)


G = "group-a"
P0 = ("lifecycle", 0)
P1 = ("lifecycle", 1)


# --- the delivery log's contract ---------------------------------------------------------


@pytest.fixture
def deliveries(database: Database) -> SqlDeliveryLog:
    return SqlDeliveryLog(database)


def rows(log: SqlDeliveryLog) -> int:
    return log.db.count(D)


def test_a_delivery_starting_at_the_same_offset_again_counts_up(
    deliveries: SqlDeliveryLog,
) -> None:
    assert deliveries.attempt(G, {P0: 10, P1: 3}) == {P0: 1, P1: 1}
    assert deliveries.attempt(G, {P0: 10, P1: 3}) == {P0: 2, P1: 2}
    assert deliveries.attempt(G, {P0: 10}) == {P0: 3}
    assert deliveries.pending(G) == {P0: (10, 3), P1: (3, 2)}


def test_a_delivery_starting_elsewhere_resets_the_count_and_keeps_one_row(
    deliveries: SqlDeliveryLog,
) -> None:
    deliveries.attempt(G, {P0: 10})
    deliveries.attempt(G, {P0: 10})
    assert deliveries.attempt(G, {P0: 14}) == {P0: 1}  # 10..13 were committed
    assert deliveries.attempt(G, {P0: 20}) == {P0: 1}
    assert deliveries.pending(G) == {P0: (20, 1)}
    assert rows(deliveries) == 1


def test_groups_count_apart(deliveries: SqlDeliveryLog) -> None:
    deliveries.attempt(G, {P0: 5})
    assert deliveries.attempt("group-b", {P0: 5}) == {P0: 1}
    assert deliveries.attempt(G, {P0: 5}) == {P0: 2}
    assert rows(deliveries) == 2


def test_a_settled_delivery_does_not_count(deliveries: SqlDeliveryLog) -> None:
    deliveries.attempt(G, {P0: 7, P1: 1})
    deliveries.attempt(G, {P0: 7, P1: 1})
    deliveries.settled(G, {P0: 7, P1: 1})
    assert deliveries.pending(G) == {P0: (7, 1), P1: (1, 1)}
    deliveries.settled(G, {P0: 7})
    assert deliveries.pending(G) == {P1: (1, 1)}  # nothing owed: the row is gone
    assert deliveries.attempt(G, {P0: 7, P1: 1}) == {P0: 1, P1: 2}


def test_settling_another_offset_or_group_changes_nothing(deliveries: SqlDeliveryLog) -> None:
    deliveries.attempt(G, {P0: 7})
    deliveries.settled(G, {P0: 6})
    deliveries.settled("group-b", {P0: 7})
    deliveries.settled(G, {})
    assert deliveries.pending(G) == {P0: (7, 1)}


def test_concurrent_first_deliveries_of_one_partition_do_not_fail(
    deliveries: SqlDeliveryLog,
) -> None:
    """Two members of a group mid-rebalance may count the same partition at
    once; the upsert takes both."""
    errors: list[BaseException] = []

    def count() -> None:
        try:
            for _ in range(10):
                deliveries.attempt(G, {P0: 1})
        except BaseException as exc:  # pragma: no cover - the failure being tested
            errors.append(exc)

    threads = [threading.Thread(target=count) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert deliveries.pending(G) == {P0: (1, 40)}
    with deliveries.db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(D)).scalar_one() == 1


# --- the runner on a real broker -----------------------------------------------------------


class SimulatedCrash(BaseException):
    """The worker dies: no handler in the runner catches this."""


def crash_on(crasher: str) -> Callable[[ToyStage, Sequence[Event]], None]:
    def fail(_stage: ToyStage, events: Sequence[Event]) -> None:
        if any(e.event_id == crasher for e in events):
            raise SimulatedCrash(crasher)

    return fail


def run_once(
    stage: ToyStage,
    cfg: RunnerConfig,
    topics: Topics,
    log: SqlDeliveryLog,
    give_up: GiveUpLog,
    until: Callable[[], object] | None = None,
) -> bool:
    """Run one runner until it crashes (True) or ``until()`` holds (False)."""
    runner = stage_runner(
        "confluent",
        stage,
        [topics.lifecycle],
        topics,
        cfg,
        EventPublisher(cfg.bootstrap, client_id=stage.name),
        on_give_up=give_up,
        deliveries=log,
    )
    crashed = threading.Event()

    def target() -> None:
        try:
            run_until_stopped(runner)
        except SimulatedCrash:
            crashed.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_for(lambda: crashed.is_set() or (until is not None and bool(until())), 20)
    runner.stop()
    thread.join(20)
    assert not thread.is_alive()
    return crashed.is_set()


def test_a_message_that_kills_the_worker_is_dead_lettered_after_max_deliveries(
    tansu: str, topics: Topics, publisher: EventPublisher, database: Database
) -> None:
    log = SqlDeliveryLog(database)
    good1, crasher, good2 = created("doc-1"), created("doc-2"), created("doc-3")
    for ev in (good1, crasher, good2):
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()
    # exclusive: no group join, each simulated restart takes the partition at once
    cfg = config(tansu, topics, max_deliveries=2, exclusive=True)
    give_up = GiveUpLog()
    stages: list[ToyStage] = []

    def restart(until: Callable[[], object] | None = None) -> bool:
        stages.append(ToyStage(f"toy-{len(stages)}", fail=crash_on(crasher.event_id)))
        return run_once(stages[-1], cfg, topics, log, give_up, until)

    assert restart()  # the batch of three kills the worker
    tp = (topics.lifecycle, 0)
    assert log.pending(cfg.group_id) == {tp: (0, 1)}
    # redelivered: one message at a time; good1 completes, the crasher alone kills it
    assert restart()
    assert stages[-1].handled_ids() == [good1.event_id]
    assert log.pending(cfg.group_id) == {tp: (1, 1)}
    assert restart()  # the crasher's second death
    assert log.pending(cfg.group_id) == {tp: (1, 2)}
    # the third delivery: dead-lettered without calling the stage; good2 goes on
    assert not restart(until=lambda: good2.event_id in stages[-1].handled_ids())
    assert stages[-1].handled_ids() == [good2.event_id]
    assert all(crasher.event_id not in ids for ids in stages[-1].calls)
    deaths_alone = sum(ids == [crasher.event_id] for s in stages for ids in s.calls)
    assert deaths_alone == 2

    (letter,) = list_dead_letters(tansu, topics)
    assert decode_event(letter.value).event_id == crasher.event_id
    assert letter.headers[h.ERROR_CLASS] == "RepeatedCrash"
    assert (
        "delivered 2 times without completing: the worker died handling it each time"
        in (letter.headers[h.ERROR])
    )
    assert letter.headers[h.ATTEMPTS] == "2"
    assert [(s, e) for s, e, _ in give_up.recorded()] == [("toy-3", crasher.event_id)]
    outputs = read_topic(tansu, topics.parsed, expect=2)
    assert sorted(decode_event(m.value()).document_id for m in outputs) == ["doc-1", "doc-3"]


def test_the_happy_path_counts_only_the_first_batch_of_an_assignment(
    tansu: str, topics: Topics, publisher: EventPublisher, database: Database
) -> None:
    log = SqlDeliveryLog(database)
    events = [created(f"doc-{i}") for i in range(6)]
    for ev in events:
        publisher.publish(topics.lifecycle, ev)
    publisher.flush()
    cfg = config(tansu, topics, exclusive=True)
    stage = ToyStage("toy-happy", max_batch=2)
    done = lambda: len(stage.handled_ids()) == len(events)  # noqa: E731
    assert not run_once(stage, cfg, topics, log, GiveUpLog(), until=done)
    assert len(stage.calls) >= 2, stage.calls
    # one row, still at the first batch's offset: later batches wrote nothing
    assert log.pending(cfg.group_id) == {(topics.lifecycle, 0): (0, 1)}


def retried(stage: ToyStage) -> Callable[[], bool]:
    return lambda: len(stage.calls) >= 2


def test_a_clean_stop_during_retries_is_not_counted_as_a_death(
    tansu: str, topics: Topics, publisher: EventPublisher, database: Database
) -> None:
    log = SqlDeliveryLog(database)
    ev = created("doc-1")
    publisher.publish(topics.lifecycle, ev)
    publisher.flush()
    cfg = config(tansu, topics, max_deliveries=1, exclusive=True, retry_max_seconds=0.2)

    def down(_stage: ToyStage, _events: Sequence[Event]) -> None:
        raise TransientError("the database is down")

    tp = (topics.lifecycle, 0)
    for _ in range(3):  # three rolling restarts during an outage
        stage = ToyStage("toy-down", fail=down)
        assert not run_once(stage, cfg, topics, log, GiveUpLog(), until=retried(stage))
        assert log.pending(cfg.group_id) == {}, "a clean stop was counted"
    stage = ToyStage("toy-up")
    assert not run_once(stage, cfg, topics, log, GiveUpLog(), until=lambda: stage.handled_ids())
    assert stage.handled_ids() == [ev.event_id]
    assert log.pending(cfg.group_id) == {tp: (0, 1)}
    assert list_dead_letters(tansu, topics) == []
