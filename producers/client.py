"""Publishing lifecycle events, as an upstream system would."""

from __future__ import annotations

from typing import Any

from domain.errors import InvalidEvent
from domain.events import LIFECYCLE_TYPES, Event, decode_lifecycle_event
from infra.kafka.journal import JournalWriter
from infra.kafka.producer import EventPublisher
from infra.kafka.topics import Topics


class LifecyclePublisher:
    """Validates and publishes lifecycle events to the lifecycle topic,
    keyed by document_id."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        max_event_bytes: int = 900_000,
        journal: JournalWriter | None = None,
    ) -> None:
        """``journal``: the embedded broker's (kbstream.journal.writer_for);
        then flush returns once the events are journaled too."""
        self.topics = topics
        self._pub = EventPublisher(
            bootstrap, max_event_bytes, client_id="kbstream-producer", journal=journal
        )

    def publish(self, event: Event | dict[str, Any]) -> Event:
        if isinstance(event, dict):
            event = decode_lifecycle_event(event)
        if event.type not in LIFECYCLE_TYPES:
            raise InvalidEvent(
                f"{event.type} is a stage event; upstream systems publish {sorted(LIFECYCLE_TYPES)}"
            )
        self._pub.publish(self.topics.lifecycle, event)
        return event

    def flush(self, timeout: float = 60.0) -> None:
        self._pub.flush(timeout)

    def close(self) -> None:
        self._pub.close()
