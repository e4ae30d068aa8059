"""A pipeline under test: real tansu broker, real database (SQLite or
PostgreSQL), real milvus-lite, every stage as a consumer group in this
process, plus helpers to publish events, wait, and read the exact state of
the three stores."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domain.documents import DocKey, Document, IndexingStatus
from domain.events import Event
from infra.kafka.producer import EventPublisher
from kbstream.bootstrap import Container
from kbstream.settings import Settings
from kbstream.stack import WorkerPool

# the stage runtimes a suite runs under (KBSTREAM_RUNTIME): the same stages
# and expectations, consumed by a confluent-kafka loop or by faust agents
RUNTIMES = ("confluent", "faust")


@dataclass
class DocSnapshot:
    """What each store holds for one document."""

    segments: set[str]
    vectors: set[str]
    texts: set[str]  # ids in the keyword (full-text) index
    state: Document | None

    @property
    def consistent(self) -> bool:
        """Both indexes hold exactly the segments: every segment has its vector
        and its keyword index entity, nothing else has one."""
        return self.segments == self.vectors == self.texts


def make_settings(
    home: Path, bootstrap: str, topic_prefix: str, database_url: str | None = None, **extra: Any
) -> Settings:
    return Settings(
        home=home,
        brokers=bootstrap,
        database_url=database_url,
        milvus_uri=str(home / "milvus.db"),
        topic_prefix=topic_prefix,
        allowed_roots=str(home),
        **extra,
    )


class Pipeline:
    def __init__(self, settings: Settings, container: Container | None = None) -> None:
        self.settings = settings
        self.container = container or Container(settings)
        self.pool: WorkerPool | None = None
        self._pub: EventPublisher | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self, stages: Sequence[str] | None = None) -> Pipeline:
        from consumers.pipeline import STAGES

        assert self.settings.brokers
        self.pool = WorkerPool(self.container, self.settings.brokers, stages or STAGES).start()
        assert self.pool.wait_ready(60), "stages did not join their consumer groups"
        return self

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
        if self._pub is not None:
            self._pub.close()
            self._pub = None

    def close(self) -> None:
        self.stop()
        self.container.close()

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- driving -------------------------------------------------------------

    @property
    def publisher(self) -> EventPublisher:
        if self._pub is None:
            assert self.settings.brokers
            self._pub = EventPublisher(self.settings.brokers, self.settings.max_event_bytes)
        return self._pub

    def publish(self, *events: Event, topic: str | None = None) -> None:
        for e in events:
            self.publisher.publish(topic or self.container.topics.lifecycle, e)
        self.publisher.flush()

    def publish_raw(self, topic: str, value: bytes | None, key: bytes | None = None) -> None:
        self.publisher.produce_raw(topic, value, key=key)
        self.publisher.flush()

    # -- observing -----------------------------------------------------------

    @property
    def tenant(self) -> str:
        return self.settings.tenant

    def state(self, dataset: str, document_id: str) -> Document | None:
        with self.container.uow(readonly=True) as uow:
            return uow.documents.get(DocKey(self.tenant, dataset, document_id))

    def snapshot(self, dataset: str, document_id: str) -> DocSnapshot:
        c = self.container
        key = DocKey(self.tenant, dataset, document_id)
        with c.uow(readonly=True) as uow:
            segments = uow.segments.ids_for_document(key)
            state = uow.documents.get(key)
        vectors = set(c.vectors.ids_for_document(key))
        texts = set(c.keyword_index.ids_for_document(key))
        return DocSnapshot(segments, vectors, texts, state)

    def wait_for(
        self,
        dataset: str,
        document_ids: Iterable[str],
        statuses: Iterable[IndexingStatus] = (IndexingStatus.COMPLETED, IndexingStatus.ERROR),
        min_version: int | None = None,
        timeout: float = 120.0,
        settled: bool = True,
    ) -> dict[str, Document]:
        """Wait until every document reaches one of ``statuses`` and (with
        ``settled``) both Milvus indexes agree with its segment rows."""
        wanted = set(statuses)
        ids = list(document_ids)
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            done = {}
            for doc_id in ids:
                st = self.state(dataset, doc_id)
                last[doc_id] = st
                if st is None or st.status not in wanted:
                    break
                if min_version is not None and st.version < min_version:
                    break
                if settled:
                    snap = self.snapshot(dataset, doc_id)
                    gone = st.status is IndexingStatus.DELETED
                    if not snap.consistent or (gone and (snap.segments or snap.texts)):
                        last[doc_id] = (st, snap)
                        break
                done[doc_id] = st
            else:
                return done
            time.sleep(0.2)
        raise AssertionError(f"documents did not settle within {timeout}s: {last}")

    def drain(self, timeout: float = 60.0, quiet: float = 0.6) -> None:
        """Wait until every stage's consumer group has committed every message
        of its input topics (see ``wait_drained``). For checks that nothing
        further happens, e.g. after a replay."""
        assert self.pool is not None and self.settings.brokers
        wait_drained(self.settings, self.pool.stages, timeout, quiet)


def wait_drained(
    settings: Settings, stages: Iterable[str], timeout: float = 60.0, quiet: float = 0.6
) -> None:
    """Wait until the consumer group of each of ``stages`` has committed every
    message of its input topics, seen twice in a row ``quiet`` seconds apart (a
    stage that just finished may still be publishing the next stage's events).
    Then whatever those messages cause (a next event, a dead letter) is written:
    a stage commits only after its side effects are durable."""
    from confluent_kafka import Consumer, TopicPartition

    from consumers.pipeline import stage_spec
    from infra.kafka.topics import Topics

    assert settings.brokers
    topics = Topics(settings.topic_prefix)
    probes = []
    for stage in stages:
        spec = stage_spec(stage)
        consumer = Consumer(
            {
                "bootstrap.servers": settings.brokers,
                "group.id": settings.group(spec.group),
                "enable.auto.commit": False,
            },
            logger=_quiet_logger(),
        )
        meta = consumer.list_topics(timeout=10).topics
        inputs = [topics.name(t) for t in spec.inputs]
        parts = [TopicPartition(t, p) for t in inputs for p in sorted(meta[t].partitions)]
        probes.append((consumer, parts))

    def lag() -> tuple[int, tuple[int, ...]]:
        behind = 0
        marks: list[int] = []
        for consumer, parts in probes:
            for tp in consumer.committed(parts, timeout=10):
                _, high = consumer.get_watermark_offsets(tp, timeout=10)
                marks.append(high)
                behind += max(0, high - max(tp.offset, 0))
        return behind, tuple(marks)

    deadline = time.monotonic() + timeout
    previous: tuple[int, ...] | None = None
    try:
        while True:
            behind, marks = lag()
            if behind == 0 and marks == previous:
                return
            previous = marks if behind == 0 else None
            if time.monotonic() > deadline:
                raise AssertionError(f"stages did not drain within {timeout}s ({behind} behind)")
            time.sleep(quiet if behind == 0 else 0.2)
    finally:
        for consumer, _ in probes:
            consumer.close()


def _quiet_logger() -> Any:
    import logging

    return logging.getLogger("rdkafka")
