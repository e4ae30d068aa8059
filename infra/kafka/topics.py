"""Physical topic names: the deployment's prefix plus a logical ``Topic``
(domain/events.py). Which stage reads and writes which is declared in
consumers/pipeline.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from domain.events import Topic
from infra.kafka.security import client_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    prefix: str = "kbstream."

    def name(self, topic: Topic) -> str:
        return f"{self.prefix}{topic.value}"

    def all(self) -> list[str]:
        return [self.name(t) for t in Topic]

    # shorthands for entry points, tests and tools that name one topic
    @property
    def lifecycle(self) -> str:
        return self.name(Topic.LIFECYCLE)

    @property
    def parsed(self) -> str:
        return self.name(Topic.PARSED)

    @property
    def segments(self) -> str:
        return self.name(Topic.SEGMENTS)

    @property
    def embedded(self) -> str:
        return self.name(Topic.EMBEDDED)

    @property
    def progress(self) -> str:
        return self.name(Topic.PROGRESS)

    @property
    def dlq(self) -> str:
        return self.name(Topic.DLQ)


def ensure_topics(bootstrap: str, topics: Topics, partitions: int, replication: int = 1) -> None:
    # here, not at the top: the batch processor names topics and loads no client
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(client_config(bootstrap), logger=logging.getLogger("rdkafka"))
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
