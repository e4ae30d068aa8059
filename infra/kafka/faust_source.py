"""The faust-streaming runtime (``KBSTREAM_RUNTIME=faust``, ``--runtime
faust``): a Source (infra/kafka/source.py) fed by a faust agent, so the same
loop and batch processor run the stage as under confluent-kafka. Only
consuming and committing differ:

- faust runs its own asyncio loop, on a thread of this source's; the stage
  runs on the loop's caller (StageRunner's thread), since the model and the
  database are blocking and the event loop must keep the group alive.
- The agent takes a batch with ``stream.noack_take()``, which acks nothing by
  itself, hands it to ``take`` and waits. ``commit`` acks the batch's events
  up to the offsets given and commits; once the whole batch is acked the agent
  takes the next. An exception in the processor never acks an unprocessed
  event: the loop ends, the source closes, and the events are redelivered to
  whoever takes the partitions next.
- faust discards the commit of a partition revoked meanwhile ("will be
  eventually processed again"): ``commit`` leaves it out of what it returns,
  so the processor does not count that redelivery as a death.
- Values arrive as raw bytes (``value_serializer="raw"``), so an undecodable
  one is a dead letter, never an agent crash.
- ``wait`` (a backoff) just waits: the agent takes nothing while its batch is
  unfinished, which is what pausing the partitions does under confluent.
- Always a group member: ``RunnerConfig.exclusive`` is confluent's alone, and
  there is no lookahead (the agent takes the next batch after the commit).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import tempfile
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as TP

# the class itself, imported once here: `faust.App` resolves lazily, which is
# not safe when several stage threads reach it at once
from faust.app.base import App

from infra.kafka.runner import RunnerConfig
from infra.kafka.security import client_config, faust_credentials
from infra.kafka.source import Rebalance, Record, TopicPartition

log = logging.getLogger(__name__)

# non-embed stages: how long a partly filled batch waits (noack_take needs a
# timeout; without one a batch waits until it is full)
MIN_WITHIN = 0.02
START_TIMEOUT = 60.0


@dataclass
class _Batch:
    """A batch the agent handed over, and what of it is acked."""

    stream: Any
    events: list[Any]
    done: asyncio.Event
    acked: set[int] = field(default_factory=set)  # indexes into events


class _LagView:
    """What LoopObserver needs of a consumer: faust's assignment, and a plain
    confluent consumer (never subscribed, so never a group member) for the
    committed offsets and watermarks."""

    def __init__(self, app: Any, bootstrap: str, group_id: str) -> None:
        self.app = app
        self.client = Consumer(
            client_config(bootstrap, **{"group.id": group_id, "enable.auto.commit": False}),
            logger=logging.getLogger("rdkafka"),
        )

    def assignment(self) -> list[TP]:
        return [TP(tp.topic, tp.partition) for tp in self.app.consumer.assignment()]

    def committed(self, parts: list[TP], timeout: float) -> list[TP]:
        return self.client.committed(parts, timeout=timeout)  # type: ignore[no-any-return]

    def get_watermark_offsets(self, tp: TP, **kw: Any) -> tuple[int, int]:
        return self.client.get_watermark_offsets(tp, **kw)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.client.close()


class FaustSource:
    def __init__(
        self,
        config: RunnerConfig,
        inputs: Sequence[str],
        max_batch: int,
        name: str,
        datadir: Path | None = None,
    ) -> None:
        self.config = config
        self.inputs = list(inputs)
        self.max_batch = max_batch
        self.name = name
        # faust keeps nothing there (memory store, no tables) but creates it
        self.datadir = datadir or Path(tempfile.gettempdir()) / "kbstream-faust"
        self._handoff: queue.Queue[_Batch] = queue.Queue()
        self._current: _Batch | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._app: Any = None
        self._lag: _LagView | None = None

    # -- the Source protocol ---------------------------------------------------------

    def open(self, listener: Rebalance) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(listener,), name=f"faust-{self.name}", daemon=True
        )
        self._thread.start()
        if not self._started.wait(START_TIMEOUT) and self._failure is None:
            raise TimeoutError(f"faust app for {self.name} did not start in {START_TIMEOUT}s")
        self._raise_failure()

    def take(self, timeout: float, linger: float) -> list[Record]:
        self._raise_failure()
        try:
            batch = (
                self._handoff.get(timeout=timeout) if timeout > 0 else self._handoff.get_nowait()
            )
        except queue.Empty:
            return []
        self._current = batch
        return [_record(e.message) for e in batch.events]

    def commit(self, offsets: Mapping[TopicPartition, int]) -> Collection[TopicPartition]:
        if self._loop is None or self._current is None:
            return ()
        future = asyncio.run_coroutine_threadsafe(self._commit(self._current, offsets), self._loop)
        return future.result()

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        # no consumer to pause: the agent takes nothing while its batch is unfinished
        return not stop.wait(seconds)

    def lag_view(self) -> _LagView | None:
        return self._lag

    def close(self) -> None:
        loop, closing = self._loop, self._closing
        if loop is not None and closing is not None and not loop.is_closed():
            loop.call_soon_threadsafe(closing.set)
        if self._thread is not None:
            self._thread.join(30)

    # -- the faust side (its loop's thread) ------------------------------------------

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"faust runtime of {self.name} failed") from self._failure

    def _run(self, listener: Rebalance) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(listener))
        except BaseException as exc:
            log.exception("faust runtime of %s failed", self.name)
            self._failure = exc
        finally:
            self._started.set()  # never leave open() waiting
            loop.close()
            log.info("stage %s: faust stopped", self.name)

    def _build_app(self, loop: asyncio.AbstractEventLoop) -> Any:
        c = self.config
        self.datadir.mkdir(parents=True, exist_ok=True)
        return App(
            c.group_id,
            broker=[f"kafka://{b.strip()}" for b in c.bootstrap.split(",") if b.strip()],
            broker_credentials=faust_credentials(c.bootstrap),
            loop=loop,
            store="memory://",
            datadir=str(self.datadir / c.group_id),
            autodiscover=False,
            web_enabled=False,
            # kbstream creates its topics (ensure_topics); faust must not, nor
            # its leader-election topic, which a stage without tables does not need
            topic_allow_declare=False,
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=c.session_timeout_ms / 1000,
            broker_heartbeat_interval=max(0.5, c.session_timeout_ms / 3000),
            broker_max_poll_interval=c.max_poll_interval_ms / 1000,
            # a fetch must hold at least one event of the largest size allowed
            consumer_max_fetch_size=max(1 << 20, 2 * c.max_event_bytes),
            # commits are the processor's, after each batch; this is only a backstop
            broker_commit_interval=5.0,
            # do not wait for unacked events on stop or rebalance: a batch the
            # stage has not finished is never acked, on purpose (redelivered)
            stream_wait_empty=False,
        )

    async def _serve(self, listener: Rebalance) -> None:
        closing = self._closing = asyncio.Event()
        app = self._app = self._build_app(asyncio.get_running_loop())
        # raw bytes: decoding is the processor's, so a bad value is a dead letter
        topic = app.topic(*self.inputs, key_serializer="raw", value_serializer="raw")
        within = max(self.config.linger, MIN_WITHIN)

        async def agent(stream: Any) -> None:
            async for events in stream.noack_take(self.max_batch, within=within):
                if closing.is_set():
                    return  # stopping: what was taken is redelivered
                batch = _Batch(stream, list(events), asyncio.Event())
                self._handoff.put(batch)
                finished = asyncio.ensure_future(batch.done.wait())
                stopped = asyncio.ensure_future(closing.wait())
                await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
                finished.cancel()
                stopped.cancel()
                if not batch.done.is_set():
                    return  # closing mid-batch: nothing unfinished is acked

        app.agent(topic, name=f"kbstream-{self.name}")(agent)

        @app.on_partitions_assigned.connect  # type: ignore[misc]
        async def assigned(_app: Any, assigned: Any, **_: Any) -> None:
            listener.assigned(sorted((tp.topic, tp.partition) for tp in assigned))

        @app.on_partitions_revoked.connect  # type: ignore[misc]
        async def revoked(_app: Any, revoked: Any, **_: Any) -> None:
            listener.revoked(sorted((tp.topic, tp.partition) for tp in revoked))

        self._lag = _LagView(app, self.config.bootstrap, self.config.group_id)
        try:
            await app.start()
            self._started.set()
            await closing.wait()
        finally:
            await _leave_group(app)
            await app.stop()
            self._lag.close()

    async def _commit(
        self, batch: _Batch, offsets: Mapping[TopicPartition, int]
    ) -> Collection[TopicPartition]:
        for i, e in enumerate(batch.events):
            m = e.message
            if i not in batch.acked and m.offset < offsets.get((m.topic, m.partition), -1):
                await batch.stream.ack(e)
                batch.acked.add(i)
        await self._app.consumer.commit()
        held = {(tp.topic, tp.partition) for tp in self._app.consumer.assignment()}
        if len(batch.acked) == len(batch.events):
            batch.done.set()  # the agent takes the next batch
        # faust discards the commit of a partition revoked meanwhile
        return [tp for tp in offsets if tp in held]


def _record(message: Any) -> Record:
    h = message.headers or ()
    items = h.items() if isinstance(h, dict) else h
    return Record(
        str(message.topic),
        int(message.partition),
        int(message.offset),
        message.key,
        message.value,
        [(k, v) for k, v in items],
    )


async def _leave_group(app: Any) -> None:
    """Leave the consumer group now, so the partitions move at once instead
    of after the session timeout. aiokafka leaves only from generation 1 on,
    and tansu numbers a group's first generation 0: without this, the next
    member to join (a restarted worker) waits for this one to time out."""
    try:
        from aiokafka.protocol.group import LeaveGroupRequest

        thread = app.consumer._thread
        coordinator = thread._ensure_consumer()._coordinator
        if coordinator.generation != 0 or not coordinator.member_id:
            return  # aiokafka leaves by itself (or never joined)
        request = LeaveGroupRequest(coordinator.group_id, coordinator.member_id)
        await thread.call_thread(coordinator._send_req, request)
    except Exception:  # best effort: the session timeout does it otherwise
        log.debug("faust: could not leave the group early", exc_info=True)
