"""Publishing events: JSON values keyed by document_id, idempotent producer,
and a flush that reports any message the broker did not take. Every broker
error leaves here as TransientError or PermanentError (infra/errors.py), so a
message too large or a missing topic is never retried as if it might pass.

With a journal (the embedded broker, infra/kafka/journal.py) a message counts
as delivered once it is in the journal too: flush writes what the broker took
there, in one statement, before it returns."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from domain.errors import PermanentError, TransientError
from domain.events import Event, encode_event
from infra.errors import classify_kafka
from infra.kafka.journal import JournalWriter, Record, encode_headers
from infra.kafka.security import client_config

log = logging.getLogger(__name__)

# room above max_event_bytes for key, headers and record framing
_FRAMING_BYTES = 65_536


class EventTooLarge(PermanentError):
    pass


class EventPublisher:
    def __init__(
        self,
        bootstrap: str,
        max_event_bytes: int = 900_000,
        client_id: str = "kbstream",
        journal: JournalWriter | None = None,
    ) -> None:
        # events are refused above max_event_bytes; dead letters are cut to fit it
        self.max_event_bytes = max_event_bytes
        self.max_message_bytes = max(max_event_bytes + _FRAMING_BYTES, 1_000_000)
        self._producer = Producer(
            client_config(
                bootstrap,
                **{
                    "client.id": client_id,
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5,
                    "message.max.bytes": self.max_message_bytes,
                },
            ),
            logger=logging.getLogger("rdkafka"),
        )
        self._errors: list[tuple[str, KafkaError]] = []
        self.journal = journal
        self._delivered: list[Record] = []  # taken by the broker, not yet journaled
        self._unflushed = 0  # produced since the last flush that emptied the queue

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._errors.append((msg.topic() or "?", err))

    def _journaled_delivery(self, headers: str | None) -> Any:
        # delivery reports carry no headers: the closure keeps them
        def done(err: KafkaError | None, msg: Any) -> None:
            self._on_delivery(err, msg)
            if err is None:
                self._delivered.append(
                    (msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), headers)
                )

        return done

    def encode(self, event: Event) -> bytes:
        value = encode_event(event)
        if len(value) > self.max_event_bytes:
            raise EventTooLarge(
                f"{event.type} for document {event.document_id} is {len(value)} bytes, above "
                f"KBSTREAM_MAX_EVENT_BYTES={self.max_event_bytes}; send large content by uri"
            )
        return value

    def publish(self, topic: str, event: Event) -> None:
        self.produce_raw(topic, self.encode(event), key=event.key.encode())

    def publish_batch(self, items: Iterable[tuple[str, Event]]) -> None:
        """All of them or, if one is too large, none: whoever retries the batch
        then does not publish the others twice."""
        encoded = [(topic, event.key.encode(), self.encode(event)) for topic, event in items]
        for topic, key, value in encoded:
            self.produce_raw(topic, value, key=key)

    def produce_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Queue one message. Raises PermanentError for a message the producer
        refuses outright (too large, unknown topic), TransientError otherwise."""
        on_delivery = (
            self._on_delivery
            if self.journal is None
            else self._journaled_delivery(encode_headers(headers))
        )
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                )
                self._unflushed += 1
                return
            except BufferError:
                # local queue full: let librdkafka send, then try again
                self._producer.poll(0.5)
            except KafkaException as exc:
                raise classify_kafka(f"producing to {topic}", exc) from exc

    def publish_all(self, items: Iterable[tuple[str, Event]]) -> None:
        for topic, event in items:
            self.publish(topic, event)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for every queued message. A message the broker rejected for
        good (too large, not authorized, no such topic) raises PermanentError;
        anything else not delivered raises TransientError. With nothing
        produced since the last flush it returns at once: there is nothing to
        wait for, and every delivery report was served by that flush."""
        if not self._unflushed and not self._errors:
            return
        remaining = self._producer.flush(timeout)
        self._unflushed = remaining
        errors, self._errors = self._errors, []
        self._journal_delivered()
        if remaining:
            raise TransientError(f"{remaining} message(s) not delivered within {timeout}s")
        if not errors:
            return
        classified = [classify_kafka(f"delivering to {topic}", err) for topic, err in errors]
        worst = next((c for c in classified if isinstance(c, PermanentError)), classified[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise type(worst)(f"broker rejected a message: {worst}{more}")

    def _journal_delivered(self) -> None:
        """Everything the broker took, also beside a failure: it is in the
        broker, and consumers may act on it."""
        delivered, self._delivered = self._delivered, []
        if self.journal is None or not delivered:
            return
        try:
            self.journal.append(delivered)
        except sqlite3.Error as exc:
            # not acknowledged: whoever publishes retries, the broker keeps a duplicate
            raise TransientError(f"could not journal {len(delivered)} event(s): {exc}") from exc

    def close(self) -> None:
        try:
            self._producer.flush(5)
            self._journal_delivered()
        except Exception:  # closing must not mask the real error
            log.exception("flush on close failed")
        if self.journal is not None:
            self.journal.close()
