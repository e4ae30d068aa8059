"""Failure bookkeeping, in one place: when an event is given up on (rejected
by its stage, or dead-lettered by the runtime after retries), its document
ends in ``error`` with a reason a person can act on."""

from __future__ import annotations

import logging

from domain.errors import DocumentError
from domain.events import Event
from domain.ports import UnitOfWorkFactory

log = logging.getLogger(__name__)


def failure_reason(stage: str, error: BaseException) -> str:
    """A DocumentError's reason is written for people already; anything else
    says which stage failed and how."""
    if isinstance(error, DocumentError):
        return error.reason
    return f"{stage} failed: {error}"


class FailureRecorder:
    def __init__(self, uow: UnitOfWorkFactory) -> None:
        self.uow = uow

    def __call__(self, stage: str, event: Event, error: BaseException) -> bool:
        """Mark the event's document as failed, if the event's version is still
        current. Returns whether the document changed."""
        with self.uow() as uow:
            doc = uow.documents.get(event.doc_key, for_update=True)
            if doc is None:
                return False
            # a lifecycle event without a version failed in parse: after its
            # claim, the current version is the one parse resolved for it
            version = doc.version if event.version is None else event.version
            if not doc.fail(version, failure_reason(stage, error)):
                return False
            uow.documents.save(doc)
            uow.commit()
        log.info("%s: %s v%s failed: %s", stage, event.doc_key, event.version, error)
        return True
