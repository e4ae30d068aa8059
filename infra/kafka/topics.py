"""Topic names. One place, so a newcomer sees the whole flow:

lifecycle -> [parse] -> parsed -> [split] -> segments -> [embed] -> embedded -> [load_vectors] -> progress
                                             segments -> [index_keywords] -> progress
                                                                 progress -> [track_status]
anything a stage cannot handle -> dlq
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    prefix: str = "kbstream."

    @property
    def lifecycle(self) -> str:
        return f"{self.prefix}lifecycle"

    @property
    def parsed(self) -> str:
        return f"{self.prefix}parsed"

    @property
    def segments(self) -> str:
        return f"{self.prefix}segments"

    @property
    def embedded(self) -> str:
        return f"{self.prefix}embedded"

    @property
    def progress(self) -> str:
        return f"{self.prefix}progress"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}dlq"

    def all(self) -> list[str]:
        return [self.lifecycle, self.parsed, self.segments, self.embedded, self.progress, self.dlq]


def ensure_topics(bootstrap: str, topics: Topics, partitions: int, replication: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap}, logger=logging.getLogger("rdkafka"))
    existing = set(admin.list_topics(timeout=15).topics)
    missing = [t for t in topics.all() if t not in existing]
    if not missing:
        return
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=replication) for t in missing],
        operation_timeout=15,
    )
    for name, fut in futures.items():
        try:
            fut.result()
            log.info("created topic %s (%d partitions)", name, partitions)
        except Exception as exc:  # already exists (a racing worker) is fine
            if "exist" not in str(exc).lower():
                raise
