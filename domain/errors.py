"""Typed errors the pipeline distinguishes: a stage retries transient ones and
dead-letters permanent ones, so the class decides what happens to an event."""

from __future__ import annotations


class KbstreamError(Exception):
    """Base of every error kbstream raises on purpose."""


class PermanentError(KbstreamError):
    """Retrying cannot help: the event or the document itself is wrong."""


class TransientError(KbstreamError):
    """A dependency is unavailable or throttling; the same work may succeed later."""


class IllegalTransition(KbstreamError):
    """A bug, not bad input: the Document aggregate was asked for a status
    change its transition table forbids."""


class InvalidEvent(PermanentError):
    """Malformed JSON, unknown type or schema_version, or a schema-invalid payload."""


class DocumentError(PermanentError):
    """A document cannot be indexed; ``reason`` is shown to people as-is, so it
    must say what is wrong and what to do about it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnparseableDocument(DocumentError):
    """The bytes could not be turned into text (corrupt, empty, unsupported, too big)."""


class SplitRuleError(DocumentError):
    """The processing rule cannot be applied (for example max_tokens above the model's limit)."""
