"""`kbstream index` and `kbstream sync`: publish a lifecycle event per new,
changed or vanished file, then wait until every document is done.

Cleanup modes (after LangChain's indexing API): ``none`` never deletes
anything (an update keeps segments that vanished from the file);
``incremental`` (what `index` does) replaces a changed document's segments;
``full`` also deletes the dataset's documents whose files are gone."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from domain.documents import IndexingStatus
from domain.events import DocForm, DocumentCreated, DocumentDeleted, DocumentUpdated, ProcessRule
from domain.splitting import resolve_rule
from infra.db.repository import DocumentState
from kbstream.bootstrap import Container
from kbstream.stack import WorkerPool, broker_for
from producers.client import LifecyclePublisher
from producers.files import FileDocument, discover

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, int], None]  # finished, total, segments


Cleanup = Literal["none", "incremental", "full"]
Lifecycle = DocumentCreated | DocumentUpdated | DocumentDeleted


@dataclass
class IndexSummary:
    documents: int = 0
    published: int = 0
    added: int = 0
    updated: int = 0
    skipped: int = 0
    deleted: int = 0
    completed: int = 0
    failed: int = 0
    segments: int = 0
    segments_added: int = 0
    segments_kept: int = 0
    segments_removed: int = 0
    embedded: int = 0
    cache_hits: int = 0
    seconds: float = 0.0
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan(
    container: Container,
    dataset: str,
    files: Sequence[FileDocument],
    force: bool = False,
    cleanup: Cleanup = "incremental",
    rule: ProcessRule | None = None,
    doc_form: DocForm = DocForm.TEXT,
) -> tuple[list[Lifecycle], list[DocumentState]]:
    """Events to publish, and the documents that are already up to date."""
    tenant = container.settings.tenant
    everything = {d.document_id: d for d in container.db.documents.list(tenant, dataset)}
    events: list[Lifecycle] = []
    unchanged: list[DocumentState] = []
    for f in files:
        state = everything.get(f.document_id)
        common: dict[str, Any] = {
            "tenant_id": tenant,
            "dataset_id": dataset,
            "document_id": f.document_id,
            "source": str(f.path),
            "uri": f.uri,
            "content_hash": f.content_hash,
            "doc_form": doc_form,
            "process_rule": rule or ProcessRule(),
        }
        if (
            state is not None
            and not force
            and state.content_hash == f.content_hash
            and state.status is IndexingStatus.COMPLETED
        ):
            unchanged.append(state)
        elif state is None or state.status is IndexingStatus.DELETED:
            events.append(DocumentCreated(**common))
        else:
            # changed, failed before, or interrupted: the incremental path resumes it
            mode = "none" if cleanup == "none" else "incremental"
            events.append(DocumentUpdated(cleanup=mode, **common))
    if cleanup == "full":
        present = {f.document_id for f in files}
        for doc_id, state in sorted(everything.items()):
            if doc_id not in present and state.status is not IndexingStatus.DELETED:
                events.append(
                    DocumentDeleted(tenant_id=tenant, dataset_id=dataset, document_id=doc_id)
                )
    return events, unchanged


def index_paths(
    container: Container,
    paths: Sequence[Path],
    dataset: str,
    force: bool = False,
    timeout: float | None = None,
    progress: ProgressFn | None = None,
    cleanup: Cleanup = "incremental",
    rule: ProcessRule | None = None,
    doc_form: DocForm = DocForm.TEXT,
) -> IndexSummary:
    started = time.perf_counter()
    files = discover(paths, container.settings.tenant, dataset)
    summary = IndexSummary(documents=len(files))
    # the embedded workers may read exactly the files given here
    roots = {str(f.path.parent) for f in files}
    extra = os.pathsep.join(sorted(roots))
    s = container.settings
    container.settings = s.model_copy(
        update={"allowed_roots": os.pathsep.join(filter(None, [s.allowed_roots, extra]))}
    )
    if rule is not None:
        # fail before publishing anything, not once per document
        resolve_rule(rule, container.token_counter.max_input_tokens)
    events, unchanged = plan(container, dataset, files, force, cleanup, rule, doc_form)
    summary.skipped = len(unchanged)
    if events:
        with broker_for(container.settings) as runtime:
            pool = None
            if runtime.embedded:
                # the broker is ours alone: no group join needed
                pool = WorkerPool(container, runtime.bootstrap, exclusive=True).start()
            try:
                publisher = LifecyclePublisher(
                    runtime.bootstrap, container.topics, container.settings.max_event_bytes
                )
                for e in events:
                    publisher.publish(e)
                publisher.flush()
                publisher.close()
                summary.published = len(events)
                _wait(
                    container,
                    dataset,
                    events,
                    pool,
                    timeout,
                    progress,
                    len(unchanged),
                    len(unchanged) + len(events),
                )
            finally:
                if pool is not None:
                    pool.stop()
    _summarise(container, dataset, files, events, summary)
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _wait(
    container: Container,
    dataset: str,
    events: Sequence[Lifecycle],
    pool: WorkerPool | None,
    timeout: float | None,
    progress: ProgressFn | None,
    already_done: int,
    total: int,
) -> None:
    want = {e.document_id: e.version for e in events}
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        states = container.db.documents.list(container.settings.tenant, dataset, list(want))
        finished = [
            d
            for d in states
            if d.version >= want[d.document_id]
            and d.status.finished
            and (d.status is not IndexingStatus.DELETED or _delete_settled(container, d))
        ]
        segments = sum(d.segment_count for d in states)
        if progress:
            progress(already_done + len(finished), total, segments)
        if len(finished) == len(want):
            return
        if pool is not None and not pool.alive():
            raise RuntimeError("a stage worker died; see the log in the home directory")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(want) - len(finished)} document(s) not finished after {timeout}s; "
                "`kbstream status` shows where they are"
            )
        time.sleep(0.25)


def _delete_settled(container: Container, d: DocumentState) -> bool:
    """A delete is done once split removed the rows and both indexes followed:
    the embedded broker forgets in-flight events when this process stops."""
    if d.segment_count:
        return False
    if container.db.postings.count_document(d.key):
        return False
    return not container.vectors.ids_for_document(d.tenant_id, d.dataset_id, d.document_id)


def _summarise(
    container: Container,
    dataset: str,
    files: Sequence[FileDocument],
    events: Sequence[Lifecycle],
    summary: IndexSummary,
) -> None:
    published = {e.document_id: e for e in events}
    ids = [f.document_id for f in files] + [
        e.document_id for e in events if isinstance(e, DocumentDeleted)
    ]
    states = container.db.documents.list(container.settings.tenant, dataset, ids)
    for d in states:
        event = published.get(d.document_id)
        if isinstance(event, DocumentDeleted):
            summary.deleted += 1
            summary.segments_removed += d.segments_removed
            continue
        summary.segments += d.segment_count
        if d.status is IndexingStatus.COMPLETED:
            summary.completed += 1
        elif d.status is IndexingStatus.ERROR:
            summary.failed += 1
            summary.errors.append({"document": d.source, "error": d.error or ""})
        if event is not None:
            summary.added += isinstance(event, DocumentCreated)
            summary.updated += isinstance(event, DocumentUpdated)
            summary.embedded += d.embedded_texts
            summary.cache_hits += d.cache_hits
            summary.segments_added += d.segments_added
            summary.segments_kept += d.segments_kept
            summary.segments_removed += d.segments_removed
