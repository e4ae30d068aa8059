"""Prometheus metrics; exposed on KBSTREAM_METRICS_PORT when set."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

EVENTS = Counter("kbstream_events_total", "Events consumed", ["stage"])
DEAD_LETTERS = Counter("kbstream_dead_letters_total", "Events dead-lettered", ["stage"])
RETRIES = Counter("kbstream_retries_total", "Transient-failure retries", ["stage"])
BATCH_SECONDS = Histogram("kbstream_batch_seconds", "Time to handle one consumed batch", ["stage"])
EMBEDDED_TEXTS = Counter("kbstream_embedded_texts_total", "Texts sent to the embedding model")
CACHE_HITS = Counter(
    "kbstream_embedding_cache_hits_total", "Segments served from the embedding cache"
)

GIVE_UP_FAILURES = Counter(
    "kbstream_give_up_failures_total",
    "Failed attempts to record a given-up event on its document",
    ["stage"],
)
STAGE_WORK = Counter(
    "kbstream_stage_work_total", "What stages did, from StageResult.counts", ["stage", "what"]
)
# counts that predate STAGE_WORK keep their own unlabelled series
_NAMED = {"embedded_texts": EMBEDDED_TEXTS, "cache_hits": CACHE_HITS}


def record_counts(stage: str, counts: dict[str, int]) -> None:
    for what, n in counts.items():
        STAGE_WORK.labels(stage, what).inc(n)
        if what in _NAMED:
            _NAMED[what].inc(n)


def serve(port: int | None) -> None:
    if port:
        start_http_server(port)
