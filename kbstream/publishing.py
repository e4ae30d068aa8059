"""Publish events and wait until their documents are done: what `index`,
`sync` and `verify --repair` share.

Without a broker of its own (no KBSTREAM_BROKERS, no `kbstream up`), the
command starts an embedded one and runs every stage in this process for the
duration. Events normally carry their files as uploads in the database; for
``file://`` references (`--by-reference`) the caller names the folders those
embedded workers may read. Workers elsewhere read only their own
KBSTREAM_ALLOWED_ROOTS.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

from consumers.contract import Emit
from domain.documents import DocKey, Document
from domain.ports import UnitOfWork
from kbstream.bootstrap import Container
from kbstream.settings import Settings
from kbstream.stack import WorkerPool, broker_for

log = logging.getLogger(__name__)

WaitProgress = Callable[[int, int], None]  # documents finished, their segments
POLL_SECONDS = 0.25


def publish_and_wait(
    container: Container,
    emits: Sequence[Emit],
    timeout: float | None = None,
    progress: WaitProgress | None = None,
    client_id: str = "kbstream-producer",
    read_roots: Collection[Path] = (),
) -> None:
    """Publish ``emits`` in order, then block until every document they name
    reached (at least) the event's version and a finished status; a delete
    counts once both indexes dropped the document too. Every event must carry
    an explicit version: it is what "done" means.

    ``read_roots``: folders the stage workers this call starts itself (no
    broker running) may read ``file://`` references from.

    Raises TimeoutError after ``timeout`` seconds, RuntimeError if an embedded
    stage worker dies."""
    if not emits:
        return
    want = _wanted(emits)

    def wait(run: Container, pool: WorkerPool | None) -> None:
        _wait(run, want, pool, timeout, progress)

    _publish_then(container, emits, wait, client_id, read_roots)


def publish_until(
    container: Container,
    emits: Sequence[Emit],
    done: Callable[[Container, UnitOfWork], bool],
    timeout: float | None = None,
    client_id: str = "kbstream-producer",
) -> None:
    """Publish ``emits`` in order, then block until ``done`` (asked in a
    read-only unit of work) holds: for events whose effect is not a version
    (a switch, a segment edit, a dataset delete). Raises like
    publish_and_wait."""

    def wait(run: Container, pool: WorkerPool | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with run.uow(readonly=True) as uow:
                if done(run, uow):
                    return
            if pool is not None and not pool.alive():
                raise RuntimeError("a stage worker died; see the log in the home directory")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"not done after {timeout}s; `kbstream status` shows where it is"
                )
            time.sleep(POLL_SECONDS)

    _publish_then(container, emits, wait, client_id)


def _publish_then(
    container: Container,
    emits: Sequence[Emit],
    wait: Callable[[Container, WorkerPool | None], None],
    client_id: str,
    read_roots: Collection[Path] = (),
) -> None:
    with broker_for(container.settings) as broker:
        # the publisher and the workers journal to the broker's journal, if it has one
        update: dict[str, object] = {"broker_journal": broker.journal}
        if broker.embedded:
            update["allowed_roots"] = _with_read_roots(container.settings, read_roots)
        run = container.scoped(**update)
        pool = None
        if broker.embedded:
            # the broker is ours alone: no consumer group join to wait for
            pool = WorkerPool(run, broker.bootstrap, exclusive=True).start()
        try:
            _publish(run, broker.bootstrap, emits, client_id)
            wait(run, pool)
        finally:
            if pool is not None:
                pool.stop()


def publish_events(container: Container, emits: Sequence[Emit], client_id: str) -> None:
    """Publish to the configured broker and return (nothing waits): for a
    server that answers at once. Needs KBSTREAM_BROKERS (or a running `up`)."""
    if not container.settings.brokers:
        raise RuntimeError("no broker configured (KBSTREAM_BROKERS, or a running `kbstream up`)")
    _publish(container, container.settings.brokers, emits, client_id)


def _publish(container: Container, bootstrap: str, emits: Sequence[Emit], client_id: str) -> None:
    publisher = container.publisher(bootstrap, client_id=client_id)
    try:
        for e in emits:
            publisher.publish(container.topics.name(e.topic), e.event)
        publisher.flush()
    finally:
        publisher.close()


def _wanted(emits: Sequence[Emit]) -> dict[DocKey, int]:
    want: dict[DocKey, int] = {}
    for e in emits:
        key, version = e.event.doc_key, e.event.version
        if version is None:
            raise ValueError(f"{e.event.type} for {key} has no version; publish_and_wait needs one")
        want[key] = max(want.get(key, 0), version)
    return want


def _wait(
    container: Container,
    want: dict[DocKey, int],
    pool: WorkerPool | None,
    timeout: float | None,
    progress: WaitProgress | None,
) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with container.uow(readonly=True) as uow:
            docs = uow.documents.get_many(want)
            finished = [d for d in docs.values() if _finished(container, uow, d, want[d.key])]
        if progress:
            progress(len(finished), sum(d.segment_count for d in docs.values()))
        if len(finished) == len(want):
            return
        if pool is not None and not pool.alive():
            raise RuntimeError("a stage worker died; see the log in the home directory")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(want) - len(finished)} document(s) not finished after {timeout}s; "
                "`kbstream status` shows where they are"
            )
        time.sleep(POLL_SECONDS)


def held_by_indexes(container: Container, doc: Document) -> Iterator[list[str]]:
    """What each index still holds of a document, asked lazily."""
    return (
        index.ids_for_document(doc.key) for index in (container.keyword_index, container.vectors)
    )


def _finished(container: Container, uow: UnitOfWork, doc: Document, version: int) -> bool:
    # what both indexes still hold of it, asked only if the rule needs it (a delete)
    return doc.done(version, held_by_indexes(container, doc))


def _with_read_roots(settings: Settings, roots: Collection[Path]) -> str:
    """KBSTREAM_ALLOWED_ROOTS with ``roots`` added."""
    if not roots:
        return settings.allowed_roots
    extra = sorted({str(Path(r).resolve()) for r in roots})
    return os.pathsep.join(filter(None, [settings.allowed_roots, *extra]))
