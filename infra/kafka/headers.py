"""The kb-* message headers, named once: the runner writes them on dead
letters, ``kbstream dlq`` reads them, replay sets ``kb-replay-for``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# on every dead letter
STAGE = "kb-stage"  # the stage that gave up
ERROR = "kb-error"  # "<ErrorClass>: <message>", for people
ERROR_CLASS = "kb-error-class"
ORIGINAL_TOPIC = "kb-original-topic"
ORIGINAL_PARTITION = "kb-original-partition"
ORIGINAL_OFFSET = "kb-original-offset"
ATTEMPTS = "kb-attempts"  # attempts on the event alone (transient retries not counted)
FAILED_AT = "kb-failed-at"  # ISO 8601, UTC
TRACE = "kb-trace"

# only on a dead letter whose body was cut to fit the broker's size limit;
# the full event is still at kb-original-topic/partition/offset while retained
TRUNCATED = "kb-truncated"
ORIGINAL_SIZE = "kb-original-size"
ORIGINAL_SHA256 = "kb-original-sha256"

# on a replayed dead letter: only this stage takes it back
REPLAY_FOR = "kb-replay-for"
REPLAYED_FROM = "kb-replayed-from"  # "<dlq partition>:<dlq offset>"

DEAD_LETTER_HEADERS: tuple[str, ...] = (
    STAGE,
    ERROR,
    ERROR_CLASS,
    ORIGINAL_TOPIC,
    ORIGINAL_PARTITION,
    ORIGINAL_OFFSET,
    ATTEMPTS,
    FAILED_AT,
    TRACE,
)
TRUNCATION_HEADERS: tuple[str, ...] = (TRUNCATED, ORIGINAL_SIZE, ORIGINAL_SHA256)

Headers = list[tuple[str, bytes]]
# what confluent_kafka's Message.headers() may return
RawHeaders = Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None


def _items(headers: RawHeaders) -> list[tuple[str, str]]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers or []
    return [
        (k, v if isinstance(v, str) else (v or b"").decode("utf-8", "replace")) for k, v in pairs
    ]


def as_dict(headers: RawHeaders) -> dict[str, str]:
    """Header values as text; the last one wins if a name repeats."""
    return dict(_items(headers))


def get(headers: RawHeaders, name: str) -> str | None:
    return next((v for k, v in _items(headers) if k == name), None)
