"""The loop every stage runs in, whatever the transport:

    open the source -> take a batch -> the processor handles it -> repeat

The batch path (decode, retry, publish, dead-letter, commit) is
infra/kafka/processor.py; taking and committing is a Source
(infra/kafka/source.py): confluent-kafka (infra/kafka/confluent_source.py),
faust (infra/kafka/faust_source.py) or memory (infra/kafka/memory.py), picked
by the registry in infra/kafka/runtimes.py. No client library is imported here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from consumers.contract import Stage
from infra.kafka import observe
from infra.kafka.dead_letters import DeadLetterFailed
from infra.kafka.processor import BatchProcessor, OnGiveUp, Stopping
from infra.kafka.redelivery import DeliveryLog
from infra.kafka.retry import RetryPolicy
from infra.kafka.source import Rebalance, Sink, Source, TopicPartition
from infra.kafka.topics import Topics

log = logging.getLogger(__name__)


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
    # The confluent runtime's alone: faust always joins the group.
    exclusive: bool = False
    # a stage that can prefetch (the embedder) starts its model on the next
    # batch while the current one is written, published and committed
    # (a source that takes ahead: confluent)
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


class StageRunner(Rebalance):
    """One stage's loop over one source. ``ready`` is set once the source has
    partitions; ``processed`` and ``dead_lettered`` count records."""

    def __init__(
        self,
        stage: Stage,
        topics: Topics,
        config: RunnerConfig,
        source: Source,
        sink: Sink,
        on_give_up: OnGiveUp,
        deliveries: DeliveryLog | None = None,
        runtime: str = "",
    ) -> None:
        self.stage = stage
        self.runtime = runtime  # its name in the registry, for the log
        self.config = config
        self.source = source
        self.sink = sink
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.processor = BatchProcessor(
            stage,
            topics,
            source,
            sink,
            on_give_up,
            dlq_topic=config.dlq_topic,
            group_id=config.group_id,
            policy=config.retry,
            stop=self.stop_event,
            max_event_bytes=config.max_event_bytes,
            max_deliveries=config.max_deliveries,
            lookahead=config.lookahead,
            deliveries=deliveries,
        )
        self.observer = observe.LoopObserver(stage.name, config.group_id, self.ready)

    @property
    def processed(self) -> int:
        return self.processor.processed

    @property
    def dead_lettered(self) -> int:
        return self.processor.dead_lettered

    def stop(self) -> None:
        self.stop_event.set()

    # the source's rebalances: the processor's, and readiness
    def assigned(self, partitions: Sequence[TopicPartition]) -> None:
        log.info("stage %s assigned %s", self.stage.name, sorted(partitions))
        self.processor.assigned(partitions)
        self.ready.set()

    def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        self.processor.revoked(partitions)

    def run(self) -> None:
        observe.bind_stage(self.stage.name)
        c = self.config
        try:
            self.source.open(self)
            log.info(
                "stage %s consuming as group %s (%s)",
                self.stage.name,
                c.group_id,
                self.runtime or type(self.source).__name__,
            )
            while not self.stop_event.is_set():
                records = self.processor.next_batch(c.poll_timeout, c.linger)
                if records:
                    self.processor.process(records)
                self.observer.tick(self.source.lag_view())
        finally:
            self.processor.close()
            self.observer.close()
            try:
                self.source.close()
            except Exception:  # closing a consumer whose broker is gone
                log.debug("source close failed", exc_info=True)
            self.sink.close()
            log.info("stage %s stopped", self.stage.name)


def run_until_stopped(runner: StageRunner) -> None:
    try:
        runner.run()
    except Stopping:
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
