"""The embedded broker's journal (infra/kafka/journal.py) against a real
SQLite file and real tansu brokers: what a journaled publisher's flush
acknowledged survives the broker, comes back in order into a new one, and is
trimmed once every group reading its topic has committed past it."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from infra.kafka.broker import EmbeddedBroker
from infra.kafka.journal import BrokerJournal, decode_headers, encode_headers
from infra.kafka.producer import EventPublisher
from infra.kafka.topics import Topics, ensure_topics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
Message = tuple[int, bytes | None, bytes | None, list[tuple[str, bytes | None]] | None]


def _read_all(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list[Message]:
    """(partition, key, value, headers) of every message, in offset order per partition."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(out) < expect:
            for m in c.consume(100, timeout=0.2):
                if m.error() is None:
                    out.append((m.partition(), m.key(), m.value(), m.headers()))
        return sorted(out, key=lambda m: m[0])  # stable: offset order within a partition
    finally:
        c.close()


def _commit(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        c.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
            asynchronous=False,
        )
    finally:
        c.close()


def _publish(bootstrap: str, journal_path: Path, items: list[tuple[str, bytes, bytes]]) -> None:
    pub = EventPublisher(bootstrap, journal=BrokerJournal(journal_path).writer(bootstrap))
    try:
        for i, (topic, key, value) in enumerate(items):
            headers = [("n", str(i).encode()), ("raw", bytes(range(256)))] if i % 3 == 0 else None
            pub.produce_raw(topic, value, key=key, headers=headers)
        pub.flush()
    finally:
        pub.close()


def test_headers_round_trip_every_byte() -> None:
    headers = [("a", bytes(range(256))), ("b", None), ("c", b"")]
    assert decode_headers(encode_headers(headers)) == headers
    assert encode_headers(None) is None and decode_headers(None) is None


def test_a_flush_journals_what_the_broker_took(tmp_path: Path, topic_prefix: str) -> None:
    topics = Topics(topic_prefix)
    path = tmp_path / "journal.db"
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, topics, partitions=3)
        with BrokerJournal(path) as j:
            epoch = j.begin_epoch(broker.bootstrap)
        items = [(topics.lifecycle, f"doc-{i % 5}".encode(), f"v{i}".encode()) for i in range(20)]
        _publish(broker.bootstrap, path, items)
        in_broker = _read_all(broker.bootstrap, topics.lifecycle, 20)
    with BrokerJournal(path) as j:
        rows = j.rows()
        assert j.counts() == {topics.lifecycle: 20}
    assert {r[0] for r in rows} == {epoch}
    # the broker's own positions, one row per message
    assert [(p, k) for _, _, p, _, k in rows] == [(p, k) for p, k, _, _ in in_broker]
    for part in {r[2] for r in rows}:
        offsets = [o for _, _, p, o, _ in rows if p == part]
        assert offsets == list(range(len(offsets)))


def test_a_publisher_without_a_journal_writes_none(tmp_path: Path, tansu: str) -> None:
    pub = EventPublisher(tansu)
    assert pub.journal is None
    pub.close()
    assert not list(tmp_path.iterdir())


def test_an_unknown_broker_has_no_writer(tmp_path: Path) -> None:
    from infra.kafka.journal import JournalError

    with BrokerJournal(tmp_path / "j.db") as j, pytest.raises(JournalError, match="no epoch"):
        j.writer("127.0.0.1:9")


def test_replay_brings_every_message_back_in_order_into_a_new_broker(
    tmp_path: Path, topic_prefix: str
) -> None:
    topics = Topics(topic_prefix)
    path = tmp_path / "journal.db"
    items = [
        (topic, f"doc-{i % 7}".encode(), f"{topic}-v{i}".encode())
        for i in range(60)
        for topic in (topics.lifecycle, topics.segments, topics.dlq)
    ]
    with EmbeddedBroker() as first:
        ensure_topics(first.bootstrap, topics, partitions=4)
        with BrokerJournal(path) as j:
            j.begin_epoch(first.bootstrap)
        _publish(first.bootstrap, path, items)
        before = {t: _read_all(first.bootstrap, t, 60) for t in (topics.lifecycle, topics.dlq)}
    # the first broker is gone, and its topics with it
    with EmbeddedBroker() as second:
        with BrokerJournal(path) as j:
            epoch = j.begin_epoch(second.bootstrap)
            assert j.replay(second.bootstrap, partitions=4) == len(items)
            rows = j.rows()
            assert j.replay(second.bootstrap, partitions=4) == 0  # all moved
        for topic, messages in before.items():
            assert _read_all(second.bootstrap, topic, 60) == messages
    assert {r[0] for r in rows} == {epoch}  # moved to the new broker's offsets


def test_a_row_journaled_for_the_old_broker_after_the_takeover_is_replayed_later(
    tmp_path: Path, topic_prefix: str
) -> None:
    """A slow producer acknowledged by the old broker journals after the new
    one replayed; the next replay (up's upkeep) brings it over."""
    topics = Topics(topic_prefix)
    path = tmp_path / "journal.db"
    with BrokerJournal(path) as j:
        old = j.begin_epoch("127.0.0.1:1")
        with EmbeddedBroker() as broker:
            j.begin_epoch(broker.bootstrap)
            assert j.replay(broker.bootstrap, partitions=2) == 0
            j.append(old, [(topics.parsed, 1, 41, b"doc-1", b"late", None)])
            assert j.replay(broker.bootstrap, partitions=2) == 1
            assert _read_all(broker.bootstrap, topics.parsed, 1) == [(1, b"doc-1", b"late", None)]


def test_trim_keeps_what_some_reader_has_not_committed(tmp_path: Path, topic_prefix: str) -> None:
    topics = Topics(topic_prefix)
    path = tmp_path / "journal.db"
    items = [
        (t, b"k", f"v{i}".encode()) for i in range(10) for t in (topics.lifecycle, topics.segments)
    ]
    readers = {
        topics.lifecycle: ["g-parse"],
        topics.segments: ["g-embed", "g-keywords"],
    }
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, topics, partitions=1)
        with BrokerJournal(path) as j:
            j.begin_epoch(broker.bootstrap)
            _publish(broker.bootstrap, path, items)
            assert j.trim(broker.bootstrap, readers) == 0  # nobody committed anything
            _commit(broker.bootstrap, "g-parse", {(topics.lifecycle, 0): 4})
            _commit(broker.bootstrap, "g-embed", {(topics.segments, 0): 10})
            assert j.trim(broker.bootstrap, readers) == 4
            # segments: g-keywords has not committed, so all ten stay
            assert j.counts() == {topics.lifecycle: 6, topics.segments: 10}
            _commit(broker.bootstrap, "g-keywords", {(topics.segments, 0): 7})
            assert j.trim(broker.bootstrap, readers) == 7
            assert [o for _, _, _, o, _ in j.rows(topics.segments)] == [7, 8, 9]
            # a topic nobody reads (as far as we know) keeps everything
            assert j.trim(broker.bootstrap, {}) == 0
            assert j.counts() == {topics.lifecycle: 6, topics.segments: 3}


_WRITER = """
import sys
from pathlib import Path
from infra.kafka.journal import BrokerJournal
from infra.kafka.producer import EventPublisher
bootstrap, path, topic, name, n = sys.argv[1:]
writer = BrokerJournal(Path(path)).writer(bootstrap)
pub = EventPublisher(bootstrap, journal=writer)
for i in range(int(n)):
    pub.produce_raw(topic, f"{name}-{i}".encode(), key=f"{name}-{i % 5}".encode())
    if i % 10 == 9:
        pub.flush()
pub.flush()
pub.close()
"""


def test_two_processes_journal_at_once(tmp_path: Path, topic_prefix: str) -> None:
    topics = Topics(topic_prefix)
    path = tmp_path / "journal.db"
    n = 300
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, topics, partitions=4)
        with BrokerJournal(path) as j:
            j.begin_epoch(broker.bootstrap)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WRITER,
                    broker.bootstrap,
                    str(path),
                    topics.parsed,
                    name,
                    str(n),
                ],
                cwd=REPO,
                stderr=subprocess.PIPE,
            )
            for name in ("a", "b")
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
        in_broker = _read_all(broker.bootstrap, topics.parsed, 2 * n)
    with BrokerJournal(path) as j:
        rows = j.rows(topics.parsed)
    assert len(rows) == 2 * n == len(in_broker)
    positions = [(p, o) for _, _, p, o, _ in rows]
    assert len(set(positions)) == 2 * n  # every message once, at its own offset
    assert sorted((p, k) for _, _, p, _, k in rows) == sorted((p, k) for p, k, _, _ in in_broker)


def test_a_flush_that_cannot_journal_is_not_an_acknowledgement(
    tmp_path: Path, tansu: str, topic_prefix: str
) -> None:
    """The caller retries (a stage does not commit its input), so the event
    the broker took is published again: a duplicate, never a loss."""
    from domain.errors import TransientError

    topics = Topics(topic_prefix)
    ensure_topics(tansu, topics, partitions=1)
    journal = BrokerJournal(tmp_path / "journal.db")
    journal.begin_epoch(tansu)
    pub = EventPublisher(tansu, journal=journal.writer(tansu))
    try:
        journal.close()  # e.g. the disk went away
        pub.produce_raw(topics.lifecycle, b"v", key=b"k")
        with pytest.raises(TransientError, match="could not journal 1 event"):
            pub.flush()
    finally:
        pub.close()
