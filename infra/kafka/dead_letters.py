"""What a dead letter looks like: the original key and bytes, the reason in
kb-* headers, and a body cut to fit when the original plus headers would
exceed what the producer and broker take (an upstream event just under the
broker's limit is accepted; the same bytes plus headers are not)."""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from domain.errors import PermanentError, TransientError
from infra.kafka import headers as h
from infra.kafka.source import Sink

log = logging.getLogger(__name__)

# per-record framing (lengths, varints, attributes) plus the headers' own framing,
# generously: an estimate that is too low makes the broker refuse the letter
RECORD_OVERHEAD = 512
HEADER_OVERHEAD = 16
# a key is an id; a poison message's "key" can be anything
LAST_RESORT_KEY_BYTES = 1024


@dataclass(frozen=True)
class DeadLetter:
    value: bytes | None
    key: bytes | None
    headers: h.Headers

    @property
    def size(self) -> int:
        return (
            len(self.value or b"")
            + len(self.key or b"")
            + sum(len(k) + len(v) + HEADER_OVERHEAD for k, v in self.headers)
            + RECORD_OVERHEAD
        )

    @property
    def truncated(self) -> bool:
        return any(k == h.TRUNCATED for k, _ in self.headers)


def reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def dead_letter(
    stage: str,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: BaseException,
    attempts: int,
) -> DeadLetter:
    headers: h.Headers = [
        (h.STAGE, stage.encode()),
        (h.ERROR, reason(error)[:2000].encode()),
        (h.ERROR_CLASS, type(error).__name__.encode()),
        (h.ORIGINAL_TOPIC, topic.encode()),
        (h.ORIGINAL_PARTITION, str(partition).encode()),
        (h.ORIGINAL_OFFSET, str(offset).encode()),
        (h.ATTEMPTS, str(attempts).encode()),
        (h.FAILED_AT, datetime.now(UTC).isoformat().encode()),
        (h.TRACE, "".join(traceback.format_exception_only(error)).strip()[:2000].encode()),
    ]
    return DeadLetter(value, key, headers)


def fit(letter: DeadLetter, max_bytes: int) -> DeadLetter:
    """The letter unchanged if it fits in ``max_bytes``; otherwise its body cut
    so that it does, with the original size and digest recorded. With a budget
    below the headers alone, the body is dropped and an outsized key cut."""
    if letter.size <= max_bytes:
        return letter
    value = letter.value or b""
    headers = [
        *letter.headers,
        (h.TRUNCATED, b"true"),
        (h.ORIGINAL_SIZE, str(len(value)).encode()),
        (h.ORIGINAL_SHA256, hashlib.sha256(value).hexdigest().encode()),
    ]
    empty = DeadLetter(b"", letter.key, headers)
    room = max_bytes - empty.size
    if room >= 0:
        return DeadLetter(value[:room], letter.key, headers)
    return DeadLetter(b"", (letter.key or b"")[:LAST_RESORT_KEY_BYTES] or None, headers)


class DeadLetterFailed(PermanentError):
    """Not even a dead letter without its body could be published: the worker
    stops without committing, rather than lose the event."""


def send(
    publisher: Sink, topic: str, letter: DeadLetter, wait: Callable[[int], None]
) -> DeadLetter:
    """Publish a dead letter cut to fit the publisher's limit and, should the
    broker still refuse it, without its body. A transient failure calls
    ``wait(attempt)`` (which may raise to stop) and tries again. Returns what
    was sent."""
    budgets = [publisher.max_event_bytes, 0]
    attempt = 0
    fitted = fit(letter, budgets.pop(0))
    while True:
        try:
            publisher.produce_raw(topic, fitted.value, key=fitted.key, headers=fitted.headers)
            publisher.flush()
            break
        except TransientError as exc:
            attempt += 1
            log.warning("dead-letter publish failed (attempt %d), retrying: %s", attempt, exc)
            wait(attempt)
        except PermanentError as exc:
            if not budgets:
                raise DeadLetterFailed(f"cannot publish a dead letter to {topic}: {exc}") from exc
            log.warning("dead letter refused (%s); sending it without its body", exc)
            fitted = fit(letter, budgets.pop(0))
    if fitted.truncated:
        log.warning(
            "dead letter body cut from %d to %d bytes to fit the broker",
            len(letter.value or b""),
            len(fitted.value or b""),
        )
    return fitted
