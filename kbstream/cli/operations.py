"""`kbstream document`, `kbstream segment`, `kbstream dataset`: Dify's
document and segment operations (kbstream.operations). Each verb publishes
one lifecycle event per target and waits until the document shows it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table

from domain.documents import Document
from domain.errors import KbstreamError
from kbstream.cli.common import (
    DatasetOpt,
    HomeOpt,
    JsonOpt,
    app,
    cli_session,
    fail,
    out,
    print_json,
)
from kbstream.queries import document_row

document_app = typer.Typer(
    help="Disable, enable, archive or unarchive documents.", no_args_is_help=True
)
segment_app = typer.Typer(help="Disable, enable or edit one segment.", no_args_is_help=True)
dataset_app = typer.Typer(help="Delete a whole dataset.", no_args_is_help=True)
app.add_typer(document_app, name="document")
app.add_typer(segment_app, name="segment")
app.add_typer(dataset_app, name="dataset")

TimeoutOpt = Annotated[float | None, typer.Option(help="give up after this many seconds")]
DocumentOpt = Annotated[str, typer.Option("--document", help="the document id")]
NodeOpt = Annotated[str | None, typer.Option("--index-node-id", help="the segment's index_node_id")]
SegmentIdOpt = Annotated[int | None, typer.Option("--segment-id", help="the segment's row id")]
DocIds = Annotated[list[str], typer.Argument(help="document ids")]


def _run(home: Any, call: Callable[[Any], Any]) -> Any:
    with cli_session(home) as (_, c):
        try:
            return call(c)
        except KbstreamError as exc:
            fail(str(exc), 1)
        except TimeoutError as exc:
            fail(str(exc), 1)


def _print_documents(docs: list[Document], as_json: bool) -> None:
    rows = [document_row(d) for d in docs]
    if as_json:
        print_json(rows)
        return
    table = Table("document", "status", "enabled", "archived", "segments")
    for r in rows:
        table.add_row(
            str(r["document_id"]),
            str(r["status"]),
            str(r["enabled"]).lower(),
            str(r["archived"]).lower(),
            str(r["segments"]),
        )
    out.print(table)


def _document_verb(action: str) -> None:
    def verb(
        documents: DocIds,
        dataset: DatasetOpt,
        home: HomeOpt = None,
        as_json: JsonOpt = False,
        timeout: TimeoutOpt = None,
    ) -> None:
        from kbstream.operations import switch_documents

        docs = _run(
            home,
            lambda c: switch_documents(c, dataset, documents, action, timeout),  # type: ignore[arg-type]
        )
        _print_documents(docs, as_json)

    verb.__doc__ = {
        "disable": "Take documents out of vector and keyword search; their segments, "
        "vectors and cached embeddings stay (enable embeds nothing).",
        "enable": "Put disabled documents back into search, from the embedding cache.",
        "archive": "Take documents out of search and refuse their updates and segment "
        "operations until unarchived.",
        "unarchive": "Undo archive: back into search, updates accepted again.",
    }[action]
    document_app.command(action)(verb)


for _action in ("disable", "enable", "archive", "unarchive"):
    _document_verb(_action)


def _segment_verb(action: str) -> None:
    def verb(
        dataset: DatasetOpt,
        document: DocumentOpt,
        index_node_id: NodeOpt = None,
        segment_id: SegmentIdOpt = None,
        home: HomeOpt = None,
        as_json: JsonOpt = False,
        timeout: TimeoutOpt = None,
    ) -> None:
        from kbstream.operations import switch_segment

        doc = _run(
            home,
            lambda c: switch_segment(
                c,
                dataset,
                document,
                action,
                index_node_id,
                segment_id,
                timeout,  # type: ignore[arg-type]
            ),
        )
        _print_documents([doc], as_json)

    verb.__doc__ = (
        "Take one segment out of both indexes (its row and cached vector stay)."
        if action == "disable"
        else "Put a disabled segment back into both indexes, from the embedding cache."
    )
    segment_app.command(action)(verb)


for _action in ("disable", "enable"):
    _segment_verb(_action)


@segment_app.command("update")
def segment_update(
    dataset: DatasetOpt,
    document: DocumentOpt,
    content: Annotated[str, typer.Option(help="the segment's new text")],
    answer: Annotated[str | None, typer.Option(help="the new answer (Q&A documents)")] = None,
    index_node_id: NodeOpt = None,
    segment_id: SegmentIdOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = None,
) -> None:
    """Give one segment new text: only it is embedded again, both indexes
    follow. Its index_node_id changes with its text; its segment id stays."""
    from kbstream.operations import update_segment

    doc = _run(
        home,
        lambda c: update_segment(
            c, dataset, document, content, answer, index_node_id, segment_id, timeout
        ),
    )
    _print_documents([doc], as_json)


@dataset_app.command("delete")
def dataset_delete(
    dataset: DatasetOpt,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = None,
) -> None:
    """Delete every document of DATASET (segments, uploads, parsed texts,
    vectors, keywords, job records, cached embeddings no other dataset uses),
    wait until both indexes dropped them, then purge the tombstones' texts."""
    if not yes and not as_json and not typer.confirm(f"delete every document of {dataset!r}?"):
        raise typer.Exit(1)
    from kbstream.operations import delete_dataset

    report = _run(home, lambda c: delete_dataset(c, dataset, timeout))
    if as_json:
        print_json(report.to_dict())
        return
    purged = report.purged
    out.print(
        f"dataset {dataset!r}: {len(report.documents)} document(s) deleted; purged "
        f"{len(purged.documents)} tombstone(s), {purged.jobs_removed} job record(s), "
        f"{purged.cache_entries_removed} cached embedding(s)"
    )
    if report.remaining:
        out.print(
            f"{len(report.remaining)} document(s) were created meanwhile by events queued "
            f"before the delete: {', '.join(report.remaining[:10])}; run it again"
        )
