"""The faust-streaming runtime: the same stages, the same contract, the same
retry and dead-letter policy, consumed by a faust agent instead of a
confluent-kafka loop (``KBSTREAM_RUNTIME=faust``, ``--runtime faust``).

What the agent does with a batch is StageRunner's, unchanged: decode (poison
-> dead letter), count the delivery, handle under the retry policy, publish
the emits and dead letters with the same producer and headers. Only
consuming and committing differ:

- ``stream.noack_take()`` hands the agent a batch and acks nothing by itself;
  the agent acks the batch's events once StageRunner has made their effects
  durable, then commits. An exception never acks an unprocessed event: it
  stops the app, and the events are redelivered to whoever takes the
  partitions next.
- Values arrive as raw bytes (``value_serializer="raw"``), so an undecodable
  one is a dead letter, never an agent crash.
- The stage runs in a worker thread (``run_in_executor``): the model and the
  database are blocking, and the event loop must keep the group alive.
  Waiting to retry blocks that thread, not the loop; the agent takes no new
  batch meanwhile, which is what pausing the partitions does in the other
  runtime.

faust runs one asyncio loop per stage, in the stage's own thread, so
``kbstream up`` can run every stage of both runtimes as threads of one process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as TP

# the class itself, imported once here: `faust.App` resolves lazily, which is
# not safe when several stage threads reach it at once
from faust.app.base import App

from consumers.contract import Stage
from infra.kafka import observe
from infra.kafka.producer import EventPublisher
from infra.kafka.redelivery import DeliveryLog
from infra.kafka.runner import OnGiveUp, RunnerConfig, StageRunner, _Stopping
from infra.kafka.security import client_config, faust_credentials
from infra.kafka.topics import Topics

log = logging.getLogger(__name__)

# non-embed stages: how long a partly filled batch waits (noack_take needs a
# timeout; without one a batch waits until it is full)
MIN_WITHIN = 0.02


class FaustMessage:
    """A faust message seen through the part of confluent-kafka's Message that
    StageRunner reads, so the batch path is shared, not copied."""

    __slots__ = ("_m",)

    def __init__(self, message: Any) -> None:
        self._m = message

    def topic(self) -> str:
        return str(self._m.topic)

    def partition(self) -> int:
        return int(self._m.partition)

    def offset(self) -> int:
        return int(self._m.offset)

    def key(self) -> bytes | None:
        return self._m.key  # type: ignore[no-any-return]

    def value(self) -> bytes | None:
        return self._m.value  # type: ignore[no-any-return]

    def headers(self) -> list[tuple[str, bytes]]:
        h = self._m.headers or ()
        items = h.items() if isinstance(h, dict) else h
        return [(k, v) for k, v in items]

    def error(self) -> None:
        return None


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


class FaustStageRunner(StageRunner):
    """StageRunner's batch path, fed and committed by a faust agent. Always
    a group member: ``RunnerConfig.exclusive`` (assign every partition without
    joining) is the confluent loop's alone."""

    def __init__(
        self,
        stage: Stage,
        inputs: Sequence[str],
        topics: Topics,
        config: RunnerConfig,
        publisher: EventPublisher,
        on_give_up: OnGiveUp,
        deliveries: DeliveryLog | None = None,
        datadir: Path | None = None,
    ) -> None:
        super().__init__(stage, inputs, topics, config, publisher, on_give_up, deliveries)
        # the agent takes its batches itself (noack_take): no lookahead here
        self._ahead = None
        # faust keeps nothing there (memory store, no tables) but creates it
        self.datadir = datadir or Path(tempfile.gettempdir()) / "kbstream-faust"
        self._failure: BaseException | None = None
        self._done = threading.Event()

    def stop(self) -> None:
        super().stop()
        self._done.set()

    def run(self) -> None:
        observe.bind_stage(self.stage.name)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        # one thread: batches are handled one after another, in order
        pool = concurrent.futures.ThreadPoolExecutor(
            1,
            thread_name_prefix=f"stage-{self.stage.name}",
            initializer=observe.bind_stage,
            initargs=(self.stage.name,),
        )
        try:
            loop.run_until_complete(self._serve(loop, pool))
        finally:
            pool.shutdown(wait=True)
            self.observer.close()
            self.publisher.close()
            loop.close()
            log.info("stage %s stopped (faust)", self.stage.name)
        if self._failure is not None:
            raise self._failure

    # -- the app ---------------------------------------------------------------

    def _app(self, loop: asyncio.AbstractEventLoop) -> Any:
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
            # commits are the agent's, after each batch; this is only a backstop
            broker_commit_interval=5.0,
            # do not wait for unacked events on stop or rebalance: a batch the
            # stage has not finished is never acked, on purpose (redelivered)
            stream_wait_empty=False,
        )

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, pool: concurrent.futures.Executor
    ) -> None:
        app = self._app(loop)
        # raw bytes: decoding is StageRunner's, so a bad value is a dead letter
        source = app.topic(*self.inputs, key_serializer="raw", value_serializer="raw")
        within = max(self.config.linger, MIN_WITHIN)
        name = self.stage.name

        async def agent(stream: Any) -> None:
            async for events in stream.noack_take(self.stage.max_batch, within=within):
                if self._done.is_set():
                    return  # stopping: what was taken is redelivered
                msgs = [FaustMessage(e.message) for e in events]
                try:
                    await loop.run_in_executor(pool, self._process, msgs)
                except Exception as exc:  # reported by run(), as the other loop raises it
                    # nothing of this batch is acked: it is redelivered
                    self._failure = exc
                    self._done.set()
                    return
                for e in events:
                    await stream.ack(e)
                await app.consumer.commit()
                taken = {(e.message.topic, e.message.partition) for e in events}
                held = {(tp.topic, tp.partition) for tp in app.consumer.assignment()}
                if not taken <= held:
                    # faust discards the commit of a partition revoked meanwhile
                    # ("will be eventually processed again"): that redelivery is
                    # a rebalance, not a death, and must not count towards
                    # dead-lettering the message as a repeated crash
                    await loop.run_in_executor(pool, self.counter.settle)

        app.agent(source, name=f"kbstream-{name}")(agent)

        @app.on_partitions_assigned.connect  # type: ignore[misc]
        async def assigned(_app: Any, assigned: Any, **_: Any) -> None:
            log.info(
                "stage %s assigned %s (faust)",
                name,
                sorted((tp.topic, tp.partition) for tp in assigned),
            )
            self.ready.set()

        lag = _LagView(app, self.config.bootstrap, self.config.group_id)
        await app.start()
        log.info(
            "stage %s consuming %s as group %s (faust)", name, self.inputs, self.config.group_id
        )
        try:
            while not self._done.is_set():
                await loop.run_in_executor(None, self.observer.tick, lag)
                await asyncio.sleep(0.5)
        finally:
            await _leave_group(app)
            await app.stop()
            lag.close()

    # -- what differs from the confluent loop ------------------------------------

    def _commit(self, msgs: list[Any]) -> None:
        """The agent acks and commits after the batch: nothing to do here."""

    def _wait(self, seconds: float) -> None:
        # no consumer to pause: the agent takes nothing while this thread waits
        if self._done.wait(seconds):  # stop() sets it too
            raise _Stopping()


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
