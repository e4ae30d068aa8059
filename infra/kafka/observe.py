"""What a stage loop tells operators: its metrics, its consumer lag, whether
it has joined its group, and the log context (stage, document, version,
event id) of what it is working on. Kept out of processor.py and runner.py,
which only call these at a few points.

Lag is ``high watermark - committed offset`` per assigned partition, read by
the loop itself every LAG_INTERVAL seconds (not per message); never below 0."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from consumers.contract import StageResult
from domain.errors import PermanentError, TransientError
from domain.events import Event
from infra import metrics
from infra.kafka.retry import Action
from infra.logs import LOG_CONTEXT, LogContext

if TYPE_CHECKING:  # the batch processor imports this module: no client library at run time
    from confluent_kafka import Consumer
    from confluent_kafka import TopicPartition as TP

log = logging.getLogger(__name__)

LAG_INTERVAL = 5.0
_QUERY_TIMEOUT = 2.0

# -- log context ---------------------------------------------------------------


def bind_stage(stage: str) -> None:
    """The stage of every log line of this thread (threads start with a fresh context)."""
    LOG_CONTEXT.set({"stage": stage})


def bind_events(events: Sequence[Event]) -> None:
    """The events the stage is handling: one event's document, version and event
    id as values; a batch's as lists; none (between batches) clears them."""
    ctx: LogContext = {"stage": (LOG_CONTEXT.get() or {}).get("stage")}
    if len(events) == 1:
        e = events[0]
        ctx.update(document=e.document_id, version=e.version, event_id=e.event_id)
    elif events:
        ctx.update(
            document=[e.document_id for e in events],
            version=[e.version for e in events],
            event_id=[e.event_id for e in events],
        )
    LOG_CONTEXT.set(ctx)


# -- per batch -----------------------------------------------------------------


def segments_in(event: Event) -> int:
    """How many segments an event carries (segments or index node ids)."""
    items = getattr(event, "segments", None) or getattr(event, "index_node_ids", None)
    return len(items) if items else 0


def record_result(stage: str, events: Sequence[Event], result: StageResult) -> None:
    """A handled batch: its counts, and the segments it handled: those its
    events carried, or for a stage whose inputs carry none (split) those it emitted."""
    metrics.record_counts(stage, result.counts)
    n = sum(segments_in(e) for e in events) or sum(segments_in(e.event) for e in result.emits)
    if n:
        metrics.SEGMENTS.labels(stage).inc(n)


def batch_done(stage: str, events: int, started: float) -> None:
    metrics.EVENTS.labels(stage).inc(events)
    metrics.BATCH_SECONDS.labels(stage).observe(time.perf_counter() - started)


def log_failure(
    log: logging.Logger, stage: str, exc: BaseException, action: Action, n: int
) -> None:
    if isinstance(exc, TransientError):
        log.warning("stage %s: transient failure (attempt %d), retrying: %s", stage, n, exc)
    elif isinstance(exc, PermanentError):
        log.info("stage %s: permanent failure (%s): %s", stage, action.value, exc)
    else:
        log.error(
            "stage %s: unexpected failure (attempt %d, %s): %s",
            stage,
            n,
            action.value,
            exc,
            exc_info=exc,
        )


def high_watermark(consumer: Consumer, tp: TP) -> tuple[int, int]:
    """(low, high) of a partition: the larger of what the broker says now and
    what its last fetch response said. tansu's memory engine answers a
    ListOffsets with the last record batch's base offset + 1, too low after a
    batch of several records; its fetch responses carry the right one."""
    low, high = consumer.get_watermark_offsets(tp, timeout=_QUERY_TIMEOUT, cached=False)
    _, fetched = consumer.get_watermark_offsets(tp, cached=True)
    return low, max(high, fetched)


# -- per loop ------------------------------------------------------------------

_LOOPS: set[LoopObserver] = set()
_LOOPS_LOCK = threading.Lock()


def loops() -> list[LoopObserver]:
    """The stage loops of this process (for /readyz)."""
    with _LOOPS_LOCK:
        return sorted(_LOOPS, key=lambda o: o.stage)


class LoopObserver:
    """One stage loop's readiness gauge and lag series, refreshed by ``tick``."""

    def __init__(self, stage: str, group: str, ready: threading.Event) -> None:
        self.stage = stage
        self.group = group
        self.ready = ready
        self.lag: dict[tuple[str, int], int] = {}
        self.lag_error: str | None = None
        self._next = 0.0
        metrics.STAGE_READY.labels(stage).set(0)
        # every series from the start, at 0: rate() and the dashboard see no gaps
        for family in (metrics.EVENTS, metrics.SEGMENTS, metrics.RETRIES, metrics.DEAD_LETTERS):
            family.labels(stage)
        metrics.BATCH_SECONDS.labels(stage)
        with _LOOPS_LOCK:
            _LOOPS.add(self)

    def tick(self, consumer: Any) -> None:
        """Called by the loop after each take; does work every LAG_INTERVAL s.
        ``consumer``: a confluent Consumer or what quacks like one (the
        source's lag_view); None while there is none."""
        metrics.STAGE_READY.labels(self.stage).set(1 if self.ready.is_set() else 0)
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + LAG_INTERVAL
        if consumer is None:
            return
        try:
            self._refresh_lag(consumer)
            self.lag_error = None
        except Exception as exc:  # the broker is away: keep the last values, say so
            self.lag_error = str(exc)
            log.debug("stage %s: lag not refreshed: %s", self.stage, exc)

    def _refresh_lag(self, consumer: Any) -> None:
        from confluent_kafka import TopicPartition as TP

        assigned = consumer.assignment()
        lag: dict[tuple[str, int], int] = {}
        if assigned:
            parts = [TP(p.topic, p.partition) for p in assigned]
            for tp in consumer.committed(parts, timeout=_QUERY_TIMEOUT):
                low, high = high_watermark(consumer, TP(tp.topic, tp.partition))
                start = tp.offset if tp.offset >= 0 else low  # no commit yet: from the start
                lag[(tp.topic, tp.partition)] = max(0, high - start)
        for topic, partition in self.lag.keys() - lag.keys():  # revoked: another member reports it
            metrics.CONSUMER_LAG.remove(self.group, topic, str(partition))
        for (topic, partition), n in lag.items():
            metrics.CONSUMER_LAG.labels(self.group, topic, str(partition)).set(n)
        self.lag = lag

    def close(self) -> None:
        metrics.STAGE_READY.labels(self.stage).set(0)
        for topic, partition in self.lag:
            metrics.CONSUMER_LAG.remove(self.group, topic, str(partition))
        self.lag = {}
        with _LOOPS_LOCK:
            _LOOPS.discard(self)
