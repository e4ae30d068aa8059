"""The embedded tansu broker, topic creation and the publisher's size guard,
against real tansu processes."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from domain.errors import PermanentError
from domain.events import DocumentCreated, decode_event, encode_event
from infra.kafka.broker import EmbeddedBroker
from infra.kafka.producer import EventPublisher, EventTooLarge
from infra.kafka.topics import Topics, ensure_topics

pytestmark = pytest.mark.integration


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


def _topic_partitions(bootstrap: str, prefix: str) -> dict[str, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(timeout=10)
    return {n: len(t.partitions) for n, t in md.topics.items() if n.startswith(prefix)}


def _read(bootstrap: str, topic: str, expect: int, timeout: float = 10.0) -> list[bytes | None]:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "enable.auto.commit": False,
        }
    )
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        out: list[bytes | None] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(out) < expect:
            out += [m.value() for m in c.consume(10, timeout=0.2) if m.error() is None]
        until = time.monotonic() + 0.5  # anything beyond what was expected
        while time.monotonic() < until:
            out += [m.value() for m in c.consume(10, timeout=0.2) if m.error() is None]
        return out
    finally:
        c.close()


def _event(content: str) -> DocumentCreated:
    return DocumentCreated(dataset_id="ds1", document_id="doc-1", source="a.txt", content=content)


# --- EmbeddedBroker -------------------------------------------------------------------


def test_broker_starts_speaks_kafka_and_stops() -> None:
    broker = EmbeddedBroker()
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert broker.start() is broker
    try:
        proc = broker._proc
        assert proc is not None and proc.poll() is None
        assert _accepts(broker.port)
        # a Kafka-protocol broker: metadata and topic creation work
        ensure_topics(broker.bootstrap, Topics("life."), partitions=2)
        assert _topic_partitions(broker.bootstrap, "life.") == {t: 2 for t in Topics("life.").all()}
    finally:
        broker.stop()
    assert proc.poll() is not None, "broker process still running after stop()"
    assert not _accepts(broker.port)
    broker.stop()  # stopping twice is harmless


def test_broker_as_context_manager_and_restart_is_empty() -> None:
    with EmbeddedBroker() as broker:
        port = broker.port
        ensure_topics(broker.bootstrap, Topics("a."), partitions=1)
        assert set(_topic_partitions(broker.bootstrap, "a.")) == set(Topics("a.").all())
    assert not _accepts(port)
    # memory-only: a broker restarted on the same port starts with no topics
    with EmbeddedBroker(port=port) as again:
        assert _topic_partitions(again.bootstrap, "a.") == {}


def test_broker_start_fails_when_the_port_is_taken() -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    broker = EmbeddedBroker(port=port)
    try:
        with pytest.raises(RuntimeError):
            broker.start(timeout=5)
    finally:
        broker.stop()
        squatter.close()


# --- ensure_topics ---------------------------------------------------------------------


def test_ensure_topics_is_idempotent(tansu: str, topic_prefix: str) -> None:
    topics = Topics(topic_prefix)
    ensure_topics(tansu, topics, partitions=3)
    first = _topic_partitions(tansu, topic_prefix)
    assert first == {t: 3 for t in topics.all()}
    ensure_topics(tansu, topics, partitions=3)
    # a different partition count never alters existing topics
    ensure_topics(tansu, topics, partitions=5)
    assert _topic_partitions(tansu, topic_prefix) == first


def test_ensure_topics_creates_only_the_missing_ones(tansu: str, topic_prefix: str) -> None:
    topics = Topics(topic_prefix)
    admin = AdminClient({"bootstrap.servers": tansu})
    admin.create_topics([NewTopic(topics.dlq, num_partitions=1, replication_factor=1)])[
        topics.dlq
    ].result(15)
    ensure_topics(tansu, topics, partitions=2)
    expected = {t: 2 for t in topics.all()}
    expected[topics.dlq] = 1
    assert _topic_partitions(tansu, topic_prefix) == expected


def test_ensure_topics_tolerates_racing_workers(tansu: str, topic_prefix: str) -> None:
    topics = Topics(topic_prefix)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        try:
            ensure_topics(tansu, topics, partitions=2)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert _topic_partitions(tansu, topic_prefix) == {t: 2 for t in topics.all()}


# --- EventPublisher size guard --------------------------------------------------------------


def test_event_above_max_event_bytes_is_refused_and_never_sent(
    tansu: str, topic_prefix: str
) -> None:
    topics = Topics(topic_prefix)
    ensure_topics(tansu, topics, partitions=1)
    limit = 2_000
    overhead = len(encode_event(_event("")))
    at_limit = _event("a" * (limit - overhead))
    above = _event("b" * (limit - overhead + 1))
    assert len(encode_event(at_limit)) == limit

    pub = EventPublisher(tansu, max_event_bytes=limit)
    try:
        with pytest.raises(EventTooLarge) as info:
            pub.publish(topics.lifecycle, above)
        assert isinstance(info.value, PermanentError)
        assert str(limit + 1) in str(info.value) and "doc-1" in str(info.value)
        with pytest.raises(EventTooLarge):
            pub.publish_all([(topics.lifecycle, at_limit), (topics.lifecycle, above)])
        pub.flush()
    finally:
        pub.close()
    got = _read(tansu, topics.lifecycle, expect=1)
    # only the event exactly at the limit went out (once, from publish_all)
    assert got == [encode_event(at_limit)]


def test_event_just_under_the_default_limit_fits_the_broker(tansu: str, topic_prefix: str) -> None:
    """The default guard must sit below what the broker really accepts."""
    topics = Topics(topic_prefix)
    ensure_topics(tansu, topics, partitions=1)
    pub = EventPublisher(tansu)
    overhead = len(encode_event(_event("")))
    big = _event("z" * (pub.max_event_bytes - overhead))
    try:
        pub.publish(topics.lifecycle, big)
        pub.flush(30)
        with pytest.raises(EventTooLarge):
            pub.publish(topics.lifecycle, _event("z" * (pub.max_event_bytes - overhead + 1)))
    finally:
        pub.close()
    got = _read(tansu, topics.lifecycle, expect=1)
    assert len(got) == 1 and got[0] is not None
    assert decode_event(got[0]) == big
