"""`kbstream index` and `kbstream sync`: publish a lifecycle event per new,
changed or vanished file, then wait until every document is done.

Cleanup modes (after LangChain's indexing API): ``none`` never deletes
anything (an update keeps segments that vanished from the file);
``incremental`` (what `index` does) replaces a changed document's segments;
``full`` also deletes the dataset's documents whose files are gone.

By default each new or changed file's bytes are uploaded into the shared
database before its event is published (uri ``kbstream-upload:<key>``), so
workers on any machine can parse it; ``by_reference`` publishes ``file://``
uris instead, which every parse worker's KBSTREAM_ALLOWED_ROOTS must cover.

Versions are explicit and small: the document's current version plus one. An
event without a version would get the same from parse, but the waiting below
needs to know which version means "done", and a redelivered explicit event
claims the same version again instead of making another."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from consumers.contract import Emit
from domain.documents import Document, IndexingStatus
from domain.errors import PermanentError
from domain.events import (
    DocForm,
    DocumentCreated,
    DocumentDeleted,
    DocumentUpdated,
    ProcessRule,
    Topic,
)
from domain.splitting import resolve_rule
from kbstream.bootstrap import Container
from kbstream.publishing import publish_and_wait
from kbstream.serving import dataset_indexes
from kbstream.stack import runs_own_workers
from producers.files import FileDocument, discover
from producers.uploads import upload_files

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
) -> tuple[list[Lifecycle], list[Document]]:
    """Events to publish, and the documents that are already up to date."""
    tenant = container.settings.tenant
    with container.uow(readonly=True) as uow:
        everything = {d.document_id: d for d in uow.documents.list(tenant, dataset)}
    events: list[Lifecycle] = []
    unchanged: list[Document] = []
    for f in files:
        state = everything.get(f.document_id)
        common: dict[str, Any] = {
            "tenant_id": tenant,
            "dataset_id": dataset,
            "document_id": f.document_id,
            "version": _next_version(state),
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
            mode: Literal["none", "incremental"] = "none" if cleanup == "none" else "incremental"
            events.append(DocumentUpdated(cleanup=mode, **common))
    if cleanup == "full":
        present = {f.document_id for f in files}
        for doc_id, state in sorted(everything.items()):
            if doc_id not in present and state.status is not IndexingStatus.DELETED:
                events.append(
                    DocumentDeleted(
                        tenant_id=tenant,
                        dataset_id=dataset,
                        document_id=doc_id,
                        version=_next_version(state),
                    )
                )
    return events, unchanged


def check_model(container: Container, dataset: str) -> None:
    """Refuse, before anything is uploaded or published, to index a dataset with
    workers this process starts itself when its embedding model neither serves
    the dataset nor is being built for it: load_vectors would hold the events
    for a worker with the right model, and this process is that worker.

    Beside `kbstream up` or KBSTREAM_BROKERS the workers are elsewhere and embed
    with their own model: nothing is checked here (a worker with the wrong model
    says so in its log, and the events wait for one with the right model)."""
    if not runs_own_workers(container.settings):
        return
    rules = dataset_indexes(container, dataset)
    if rules.may_load(container.model_identity[1]):
        return
    serving = rules.serving or rules.building
    assert serving is not None  # may_load allows a dataset without either
    spec = serving.target.model_spec
    raise ModelMismatch(
        f"dataset {dataset!r} is served by embedding model {spec}, not {container.model_spec} "
        f"(KBSTREAM_EMBEDDING_MODEL): index it with KBSTREAM_EMBEDDING_MODEL={spec}, or "
        f"switch it first with `kbstream rebuild --dataset {dataset} --model "
        f"{container.model_spec}`"
    )


class ModelMismatch(PermanentError):
    """The model this process would embed with does not serve the dataset."""


def _next_version(state: Document | None) -> int:
    return (state.version if state is not None else 0) + 1


def upload_sources(
    container: Container, events: Sequence[Lifecycle], files: Sequence[FileDocument]
) -> list[Lifecycle]:
    """Upload the file behind every created/updated event (committed before
    anything is published) and point the events at the uploads."""
    paths = {f.document_id: f.path for f in files}
    items = [
        (e.doc_key, paths[e.document_id])
        for e in events
        if isinstance(e, DocumentCreated | DocumentUpdated)
    ]
    uploaded = upload_files(container.uow, items, container.settings.max_document_bytes)
    out: list[Lifecycle] = []
    for e in events:
        done = uploaded.get(e.doc_key)
        if done is not None and not isinstance(e, DocumentDeleted):
            e = e.model_copy(update={"uri": done.uri, "content_hash": done.content_hash})
        out.append(e)
    return out


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
    by_reference: bool = False,
) -> IndexSummary:
    started = time.perf_counter()
    files = discover(paths, container.settings.tenant, dataset)
    summary = IndexSummary(documents=len(files))
    if rule is not None:
        # fail before publishing anything, not once per document
        resolve_rule(rule, container.token_counter.max_input_tokens)
    events, unchanged = plan(container, dataset, files, force, cleanup, rule, doc_form)
    events, refused = _refuse_archived(container, dataset, events, summary)
    summary.skipped = len(unchanged)
    if events:
        check_model(container, dataset)
    if not by_reference:
        events = upload_sources(container, events, files)
    if events:
        total = len(unchanged) + len(events)

        def waited(finished: int, segments: int) -> None:
            if progress:
                progress(len(unchanged) + finished, total, segments)

        publish_and_wait(
            container,
            [Emit(Topic.LIFECYCLE, e) for e in events],
            timeout=timeout,
            progress=waited,
            # workers this process starts itself may read the files it names
            read_roots={f.path.parent for f in files} if by_reference else (),
        )
        summary.published = len(events)
    _summarise(
        container, dataset, [f for f in files if f.document_id not in refused], events, summary
    )
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _refuse_archived(
    container: Container, dataset: str, events: list[Lifecycle], summary: IndexSummary
) -> tuple[list[Lifecycle], set[str]]:
    """The events to publish: an archived document's update would be refused
    by parse (and waited for in vain), so it fails here, with the reason. Its
    delete (`sync --cleanup full`) is published: Dify deletes archived
    documents too."""
    with container.uow(readonly=True) as uow:
        found = uow.documents.list(
            container.settings.tenant, dataset, [e.document_id for e in events]
        )
    archived = {d.document_id: d for d in found if d.archived and not d.deleted}
    out: list[Lifecycle] = []
    refused: set[str] = set()
    for e in events:
        d = archived.get(e.document_id)
        if d is None or isinstance(e, DocumentDeleted):
            out.append(e)
            continue
        refused.add(d.document_id)
        summary.failed += 1
        summary.errors.append({"document": d.source, "error": d.refusal(e.type) or "archived"})
    return out, refused


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
    with container.uow(readonly=True) as uow:
        states = uow.documents.list(container.settings.tenant, dataset, ids)
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
