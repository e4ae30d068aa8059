"""Prometheus metrics, named by the metrics contract (README "Metrics and health").

Every process that runs stages serves them on KBSTREAM_METRICS_PORT
(infra/health.py: /metrics, /healthz, /readyz on one port). `kbstream up
--workers` is one container with several processes: it runs them in
prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set before
prometheus_client is first imported, see kbstream/supervisor.py) and serves
their aggregate on its one port; the workers serve no port of their own.

CONTRACT_METRICS lists every name the contract promises, in one place: the
dashboard's tests check each panel query against it and a running worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from domain.ports import EmbeddingProvider

STAGE = ["stage"]
# decided by prometheus_client when it was first imported, from PROMETHEUS_MULTIPROC_DIR
MULTIPROCESS = values.ValueClass is not values.MutexValue


class _OwnedGauge(Gauge):
    """A gauge whose series move between processes: a partition's lag is
    reported by the member that owns it now. prometheus-client cannot remove a
    series from a process's multiprocess file, so a revoked one is zeroed
    there instead, which leaves the livesum over processes right."""

    def remove(self, *labelvalues: Any) -> None:
        if MULTIPROCESS:
            self.labels(*labelvalues).set(0)
        else:
            super().remove(*labelvalues)


EVENTS = Counter("kbstream_events_total", "Events consumed", STAGE)
SEGMENTS = Counter("kbstream_segments_total", "Segments handled", STAGE)
BATCH_SECONDS = Histogram(
    "kbstream_batch_seconds",
    "Time to handle one consumed batch",
    STAGE,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
RETRIES = Counter("kbstream_retries_total", "Transient-failure retries", STAGE)
DEAD_LETTERS = Counter("kbstream_dead_letters_total", "Events dead-lettered", STAGE)
# Multiprocess aggregation (`up --workers`): livesum, over live processes only
# (supervisor.py marks a dead worker's gauges dead). A partition's lag is
# owned by one process at a time, so the sum is its lag; a stage's ready
# gauge sums to its ready members, as `sum by (stage)` over pods does.
CONSUMER_LAG = _OwnedGauge(
    "kbstream_consumer_lag",
    "High watermark minus the group's committed offset, per assigned partition",
    ["group", "topic", "partition"],
    multiprocess_mode="livesum",
)
CACHE_HITS = Counter(
    "kbstream_embedding_cache_hits_total", "Segments served from the embedding cache"
)
EMBEDDED_TEXTS = Counter("kbstream_embedded_texts_total", "Texts sent to the embedding model")
EMBED_SECONDS = Histogram(
    "kbstream_embedding_request_seconds",
    "Latency of one call to the embedding model (or remote service)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
EMBED_BATCH = Histogram(
    "kbstream_embedding_batch_size",
    "Texts per call to the embedding model",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
STAGE_READY = Gauge(
    "kbstream_stage_ready",
    "1 when the stage loop has joined its group",
    STAGE,
    multiprocess_mode="livesum",
)
# the two database gauges come from DocumentStatusCollector (track_status processes only)
DOCUMENTS = "kbstream_documents"
OLDEST_PENDING = "kbstream_oldest_pending_document_age_seconds"

CONTRACT_METRICS: tuple[str, ...] = (
    "kbstream_events_total",
    "kbstream_segments_total",
    "kbstream_batch_seconds",
    "kbstream_retries_total",
    "kbstream_dead_letters_total",
    "kbstream_consumer_lag",
    "kbstream_embedding_cache_hits_total",
    "kbstream_embedded_texts_total",
    "kbstream_embedding_request_seconds",
    "kbstream_embedding_batch_size",
    DOCUMENTS,
    OLDEST_PENDING,
    "kbstream_stage_ready",
)

# beyond the contract
GIVE_UP_FAILURES = Counter(
    "kbstream_give_up_failures_total",
    "Failed attempts to record a given-up event on its document",
    STAGE,
)
STAGE_WORK = Counter(
    "kbstream_stage_work_total", "What stages did, from StageResult.counts", ["stage", "what"]
)
# counts with a contract series of their own
_NAMED = {"embedded_texts": EMBEDDED_TEXTS, "cache_hits": CACHE_HITS}


def record_counts(stage: str, counts: dict[str, int]) -> None:
    for what, n in counts.items():
        STAGE_WORK.labels(stage, what).inc(n)
        if what in _NAMED:
            _NAMED[what].inc(n)


class MeasuredEmbedder:
    """An EmbeddingProvider that times each model call and records its batch size;
    everything else is the wrapped provider's."""

    def __init__(self, inner: EmbeddingProvider) -> None:
        self.inner = inner
        self.provider = inner.provider
        self.model = inner.model
        self.dim = inner.dim
        self.max_input_tokens = inner.max_input_tokens

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if texts:
            EMBED_BATCH.observe(len(texts))
        with EMBED_SECONDS.time():
            return self.inner.embed(texts)

    def __getattr__(self, name: str) -> Any:  # warm_up and the like
        return getattr(self.inner, name)


@dataclass(frozen=True)
class StatusSnapshot:
    documents: dict[str, int]  # status -> count
    oldest_pending_seconds: float  # 0 when nothing is pending


class DocumentStatusCollector(Collector):
    """kbstream_documents{status} and the oldest pending document's age, read
    from the database at scrape time, cached ``ttl`` seconds so a scrape storm
    costs one query."""

    def __init__(self, read: Callable[[], StatusSnapshot], ttl: float = 5.0) -> None:
        self.read = read
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, StatusSnapshot] | None = None

    def snapshot(self) -> StatusSnapshot | None:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.ttl:
                try:
                    self._cached = (now, self.read())
                except Exception:  # the database is down: no series, /readyz says why
                    return None
            return self._cached[1]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # without this, registering would call collect() (a query) at once
        yield GaugeMetricFamily(DOCUMENTS, "Documents by indexing status", labels=["status"])
        yield GaugeMetricFamily(OLDEST_PENDING, "Age of the oldest document not yet finished")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot()
        if snap is None:
            return
        docs = GaugeMetricFamily(DOCUMENTS, "Documents by indexing status", labels=["status"])
        for status, n in sorted(snap.documents.items()):
            docs.add_metric([status], n)
        yield docs
        yield GaugeMetricFamily(
            OLDEST_PENDING,
            "Age of the oldest document not yet finished",
            value=snap.oldest_pending_seconds,
        )
