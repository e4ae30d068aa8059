"""The processor's lookahead (infra/kafka/lookahead.py) with a scripted source:
the next batch is prefetched while the current one is handed out, a failed
prefetch is only a missed chance, and messages of a partition revoked after
they were taken are dropped (their next owner reads them from the commit)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from consumers.contract import StageResult
from domain.errors import InvalidEvent
from domain.events import Event, SegmentsRemoved, decode_event, encode_event
from infra.kafka.lookahead import Lookahead
from infra.kafka.source import Record


def Msg(partition: int, offset: int, value: bytes | None = None) -> Record:
    value = value if value is not None else encode_event(removal(f"{partition}-{offset}"))
    return Record("segments", partition, offset, None, value)


def removal(doc: str) -> Event:
    return SegmentsRemoved(
        tenant_id="t", dataset_id="d", document_id=doc, version=1, index_node_ids=["x"]
    )


def decode_or_none(msg: Record) -> Event | None:
    """As the processor's: None for what it dead-letters when the batch is handled."""
    try:
        return decode_event(msg.value)
    except InvalidEvent:
        return None


@contextmanager
def looking_ahead(stage: RecordingStage) -> Iterator[Lookahead]:
    ahead = Lookahead(stage, "embed", decode_or_none)
    try:
        yield ahead
    finally:
        ahead.close()


class RecordingStage:
    name = "embed"
    max_batch = 10

    def __init__(self, fail: bool = False) -> None:
        self.prefetched: list[list[str]] = []
        self.threads: set[str] = set()
        self.fail = fail

    def prefetch(self, events: Sequence[Event]) -> None:
        self.threads.add(threading.current_thread().name)
        self.prefetched.append([e.document_id for e in events])
        if self.fail:
            raise RuntimeError("model down")

    def handle(self, events: Sequence[Event]) -> StageResult:
        raise AssertionError("the lookahead never handles")


class Script:
    """take(timeout, linger): hands out the scripted batches in turn; a
    callable in the script runs instead (a rebalance inside a consume call)."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)

    def __call__(self, timeout: float, linger: float) -> list[Any]:
        while self.steps:
            step = self.steps.pop(0)
            if callable(step):
                step()
                continue
            return list(step)
        return []


def ids(msgs: list[Record]) -> list[tuple[int, int]]:
    return [(m.partition, m.offset) for m in msgs]


def test_the_next_batch_is_prefetched_while_the_current_one_is_handled() -> None:
    stage = RecordingStage()
    with looking_ahead(stage) as ahead:
        take = Script([Msg(0, 0), Msg(0, 1)], [Msg(0, 2)])
        first = ahead.next_batch(take, 0.5, 0.0)
        assert ids(first) == [(0, 0), (0, 1)]
        assert stage.prefetched == []  # a fresh batch: handle() embeds it itself
        ahead.take_next(take)  # the processor knows `first` is no redelivery after a death
        assert ids(ahead.next_batch(take, 0.5, 0.0)) == [(0, 2)]  # the held one, prefetched
        assert stage.prefetched == [["0-2"]]
        assert all(t.startswith("stage-embed-ahead") for t in stage.threads)
        assert ahead.next_batch(take, 0.5, 0.0) == []


def test_nothing_is_taken_ahead_unless_asked() -> None:
    """After a worker died the processor handles one message at a time and does
    not call take_next: nothing runs beside the message being counted."""
    stage = RecordingStage()
    with looking_ahead(stage) as ahead:
        take = Script([Msg(0, 0)], [Msg(0, 1)])
        assert ids(ahead.next_batch(take, 0.5, 0.0)) == [(0, 0)]
        assert ids(ahead.next_batch(take, 0.5, 0.0)) == [(0, 1)]
        assert stage.prefetched == []


def test_a_failed_prefetch_still_hands_the_batch_out() -> None:
    stage = RecordingStage(fail=True)
    with looking_ahead(stage) as ahead:
        take = Script([Msg(0, 0)], [Msg(0, 1)])
        ahead.next_batch(take, 0.5, 0.0)
        ahead.take_next(take)
        assert ids(ahead.next_batch(take, 0.5, 0.0)) == [(0, 1)]
        assert stage.prefetched == [["0-1"]]


def test_undecodable_messages_are_left_to_the_runner() -> None:
    stage = RecordingStage()
    with looking_ahead(stage) as ahead:
        take = Script([Msg(0, 0)], [Msg(0, 1, b"not json"), Msg(0, 2)])
        ahead.next_batch(take, 0.5, 0.0)
        ahead.take_next(take)
        batch = ahead.next_batch(take, 0.5, 0.0)
        assert ids(batch) == [(0, 1), (0, 2)]  # the processor dead-letters the first
        assert stage.prefetched == [["0-2"]]


def test_what_the_rebalancing_call_returns_is_kept() -> None:
    stage = RecordingStage()
    with looking_ahead(stage) as ahead:
        take = Script(
            [Msg(0, 4)],
            # the consume call that takes ahead sees partition 0 revoked and assigned
            # again, and returns what the consumer reads from the committed offset
            lambda: ahead.revoked([("segments", 0)]),
            [Msg(0, 4), Msg(0, 5)],
        )
        assert ids(ahead.next_batch(take, 0.5, 0.0)) == [(0, 4)]
        ahead.take_next(take)
        assert ids(ahead.next_batch(take, 0.5, 0.0)) == [(0, 4), (0, 5)]


def test_a_held_batch_loses_only_its_revoked_partitions() -> None:
    stage = RecordingStage()
    with looking_ahead(stage) as ahead:
        take = Script([Msg(0, 4)], [Msg(0, 5), Msg(1, 7)])
        ahead.next_batch(take, 0.5, 0.0)
        ahead.take_next(take)
        ahead.revoked([("segments", 0)])  # while the batch before it was handled
        # (0, 5) was taken before the revocation: partition 0's owner reads it again
        assert ids(ahead.next_batch(take, 0.5, 0.0)) == [(1, 7)]
        ahead.revoked([("segments", 1)])  # no batch held: nothing to drop
        assert ahead.next_batch(take, 0.5, 0.0) == []
