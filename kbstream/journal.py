"""The embedded broker's journal in the kbstream home (infra/kafka/journal.py):
which processes write it, and its upkeep.

Every process that publishes to an embedded broker gets the journal's path
in ``Settings.broker_journal``: `kbstream up` and its threads, its worker
processes (KBSTREAM_BROKER_JOURNAL), verbs that find a live `up` (stack.json
names the journal), and one-shot verbs with a temporary broker of their own.
With KBSTREAM_BROKERS naming an external broker there is no journal: Kafka
keeps what it acknowledged itself.

Whoever starts an embedded broker calls ``take_over`` before anything else
uses it: a new epoch, and the journal replayed into the empty broker.
``upkeep`` (every TRIM_INTERVAL_S in `up`, and at a clean stop) replays rows
a slow producer journaled for the previous broker after the takeover, and
trims what every consumer group reading a topic has committed.

Dead letters are journaled like every other event and kept until `kbstream
dlq replay` has committed past them (its group, ``<prefix>dlq-replay``), so
`kbstream dlq list` after a restart shows the letters not replayed yet."""

from __future__ import annotations

import logging
from pathlib import Path

from consumers.pipeline import STAGES, stage_spec
from infra.kafka.journal import BrokerJournal, JournalWriter
from infra.kafka.topics import Topics
from kbstream.dlq import replay_group
from kbstream.settings import Settings

log = logging.getLogger(__name__)

JOURNAL_FILE = "broker-journal.db"
TRIM_INTERVAL_S = 10.0


def journal_path(home: Path) -> Path:
    return home / JOURNAL_FILE


def topic_readers(settings: Settings) -> dict[str, list[str]]:
    """Physical topic -> the consumer groups that read it (pipeline table)."""
    topics = Topics(settings.topic_prefix)
    readers: dict[str, list[str]] = {}
    for name in STAGES:
        spec = stage_spec(name)
        for t in spec.inputs:
            readers.setdefault(topics.name(t), []).append(settings.group(spec.group))
    readers[topics.dlq] = [replay_group(topics)]
    return readers


def writer_for(settings: Settings, bootstrap: str) -> JournalWriter | None:
    """The journal handle for a producer of ``bootstrap``; None: not embedded."""
    if settings.broker_journal is None:
        return None
    return BrokerJournal(settings.broker_journal).writer(bootstrap)


def take_over(settings: Settings, bootstrap: str) -> Path:
    """Make the new, empty embedded broker at ``bootstrap`` the journal's, and
    replay into it what earlier brokers acknowledged. Returns the journal's path."""
    path = journal_path(settings.home)
    with BrokerJournal(path) as journal:
        journal.begin_epoch(bootstrap)
        n = journal.replay(bootstrap, settings.partitions)
    if n:
        log.info("replayed %d journaled event(s) into the embedded broker %s", n, bootstrap)
    return path


def upkeep(settings: Settings, bootstrap: str, replay: bool = True) -> tuple[int, int]:
    """(replayed, trimmed). Best effort: a failure is logged, and the next
    upkeep or start does the work."""
    path = settings.broker_journal or journal_path(settings.home)
    try:
        with BrokerJournal(path) as journal:
            replayed = journal.replay(bootstrap, settings.partitions) if replay else 0
            trimmed = journal.trim(bootstrap, topic_readers(settings))
    except Exception as exc:
        log.warning("broker journal upkeep failed (%s); it is retried later", exc)
        return 0, 0
    if replayed or trimmed:
        log.info("broker journal: %d late event(s) replayed, %d trimmed", replayed, trimmed)
    return replayed, trimmed
