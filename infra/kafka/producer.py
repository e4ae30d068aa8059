"""Publishing events: JSON values keyed by document_id, idempotent producer,
and a flush that reports any message the broker did not take."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, Producer

from domain.errors import PermanentError, TransientError
from domain.events import Event, encode_event

log = logging.getLogger(__name__)


class EventTooLarge(PermanentError):
    pass


class EventPublisher:
    def __init__(
        self, bootstrap: str, max_event_bytes: int = 900_000, client_id: str = "kbstream"
    ) -> None:
        self.max_event_bytes = max_event_bytes
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "client.id": client_id,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.max.bytes": max(max_event_bytes + 65_536, 1_000_000),
            },
            logger=logging.getLogger("rdkafka"),
        )
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def publish(self, topic: str, event: Event) -> None:
        value = encode_event(event)
        if len(value) > self.max_event_bytes:
            raise EventTooLarge(
                f"{event.type} for document {event.document_id} is {len(value)} bytes, above "
                f"KBSTREAM_MAX_EVENT_BYTES={self.max_event_bytes}; send large content by uri"
            )
        self.produce_raw(topic, value, key=event.key.encode())

    def produce_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
                )
                return
            except BufferError:
                # local queue full: let librdkafka send, then try again
                self._producer.poll(0.5)

    def publish_all(self, items: Iterable[tuple[str, Event]]) -> None:
        for topic, event in items:
            self.publish(topic, event)

    def flush(self, timeout: float = 60.0) -> None:
        remaining = self._producer.flush(timeout)
        errors, self._errors = self._errors, []
        if remaining:
            raise TransientError(f"{remaining} message(s) not delivered within {timeout}s")
        if errors:
            raise TransientError(f"broker rejected {len(errors)} message(s): {errors[0]}")

    def close(self) -> None:
        try:
            self._producer.flush(5)
        except Exception:  # closing must not mask the real error
            log.exception("flush on close failed")
