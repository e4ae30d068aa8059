"""`kbstream search`, `stats`, `status` and `verify`: reading what is indexed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from domain.errors import KbstreamError
from kbstream import queries
from kbstream.cli.common import (
    DatasetOpt,
    HomeOpt,
    JsonOpt,
    OptionalDatasetOpt,
    app,
    cli_session,
    fail,
    out,
    print_json,
)

if TYPE_CHECKING:
    from kbstream.bootstrap import Container


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="what to look for")],
    dataset: DatasetOpt,
    mode: Annotated[str, typer.Option(help="vector | keyword | hybrid")] = "hybrid",
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, max=1000)] = 5,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search DATASET."""
    from kbstream.search import search as run_search

    if mode not in ("vector", "keyword", "hybrid"):
        fail(f"--mode must be vector, keyword or hybrid, not {mode!r}")
    with cli_session(home) as (_, c):
        try:
            hits = run_search(c, dataset, query, mode, top_k)  # type: ignore[arg-type]
        except KbstreamError as exc:
            fail(str(exc))
    if as_json:
        print_json([h.to_dict() for h in hits])
        return
    table = Table("score", "document", "content")
    for h in hits:
        text = h.content if len(h.content) < 200 else h.content[:200] + "…"
        table.add_row(f"{h.score:.4f}", Path(h.document).name, text)
    out.print(table)


@app.command()
def stats(dataset: DatasetOpt, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Counts for DATASET: documents, segments, vectors, keyword entities, cache."""
    with cli_session(home) as (_, c):
        data = queries.dataset_stats(c, dataset)
    if as_json:
        print_json(data)
        return
    table = Table("what", "count")
    for k, v in data.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    out.print(table)


@app.command()
def status(
    dataset: OptionalDatasetOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    document: Annotated[str | None, typer.Option(help="one document id")] = None,
    job: Annotated[str | None, typer.Option(help="one batch-import job id")] = None,
    indexes: Annotated[
        bool, typer.Option("--indexes", help="only the dataset's vector indexes (models)")
    ] = False,
) -> None:
    """One row per document of DATASET (status, error, segments), one
    document, or one batch-import job (--dataset and --document pick one when
    several datasets or documents use the job id)."""
    if job is not None:
        _job_status(home, job, as_json, dataset, document)
        return
    if dataset is None and document is None:
        fail("give --dataset, --document or --job")
    with cli_session(home) as (_, c):
        if dataset is None:
            assert document is not None
            dataset = _only_dataset(c, document)
        if indexes:
            _print_indexes(c, dataset, as_json)
            return
        rows = queries.document_rows(c, dataset, [document] if document else None)
        vector_indexes = [] if document or as_json else _index_table(c, dataset)
    if document and not rows:
        fail(f"no document {document!r} in dataset {dataset!r}", 1)
    if as_json:
        print_json(rows[0] if document else rows)
        return
    table = Table("document", "status", "search", "segments", "error")
    for r in rows:
        color = {"completed": "green", "error": "red"}.get(str(r["status"]), "yellow")
        table.add_row(
            str(r["document"]),
            f"[{color}]{r['status']}[/{color}]",
            "archived" if r["archived"] else ("enabled" if r["enabled"] else "disabled"),
            str(r["segments"]),
            r["error"] or r["last_dropped"] or "",
        )
    out.print(table)
    if vector_indexes:
        out.print(_render_indexes(vector_indexes))


def _index_table(c: Container, dataset: str) -> list[dict[str, object]]:
    from kbstream.rebuild import index_rows

    return index_rows(c, dataset)


def _render_indexes(rows: list[dict[str, object]]) -> Table:
    table = Table("vector index model", "collection", "state", "progress", "drop after")
    for r in rows:
        total = int(str(r["progress_total"]))
        progress = f"{r['progress_done']}/{total}" if total else ""
        table.add_row(
            str(r["model"]),
            str(r["collection"]),
            str(r["state"]),
            progress,
            str(r["drop_after"] or ""),
        )
    return table


def _print_indexes(c: Container, dataset: str, as_json: bool) -> None:
    rows = _index_table(c, dataset)
    if as_json:
        print_json(rows)
    else:
        out.print(_render_indexes(rows))


def _job_status(
    home: Path | None, job: str, as_json: bool, dataset: str | None, document: str | None
) -> None:
    with cli_session(home) as (_, c):
        rows = queries.job_status(c, job, dataset)
    rows = [r for r in rows if document is None or r["document_id"] == document]
    if not rows:
        where = f" in dataset {dataset!r}" if dataset else ""
        fail(f"no batch-import job {job!r}{where}", 1)
    if len(rows) > 1:
        found = ", ".join(f"{r['dataset_id']}/{r['document_id']}" for r in rows)
        fail(f"job id {job!r} is used by several documents ({found}); add --dataset and --document")
    row = rows[0]
    if as_json:
        print_json(row)
        return
    table = Table("field", "value")
    for k, v in row.items():
        table.add_row(k, str(v))
    out.print(table)


def _only_dataset(c: Container, document: str) -> str:
    found = queries.datasets_of(c, document)
    if not found:
        fail(f"no document {document!r}", 1)
    if len(found) > 1:
        fail(f"document {document!r} is in several datasets: {', '.join(found)}; add --dataset")
    return found[0]


@app.command()
def verify(
    dataset: DatasetOpt,
    repair: Annotated[bool, typer.Option(help="converge what differs")] = False,
    stuck_after: Annotated[
        float, typer.Option(help="seconds before an unfinished document counts as stuck")
    ] = 600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check that segments, vectors and the keyword index agree, document by
    document; with --repair, fix what differs. Exit 1 if drift remains."""
    from kbstream.verify import repair as run_repair
    from kbstream.verify import verify as run_verify

    with cli_session(home) as (_, c):
        try:
            check = run_repair if repair else run_verify
            report = check(c, dataset, stuck_after)
        except (KbstreamError, TimeoutError, RuntimeError) as exc:
            fail(str(exc))
    data = report.to_dict()
    if as_json:
        print_json(data)
    else:
        out.print(
            f"{dataset}: {data['documents']} documents, {data['segments']} segments, "
            f"{data['vectors']} vectors, {data['keyword_segments']} keyword entities"
        )
        if report.repaired:
            out.print(f"[green]repaired {len(report.repaired)} problem(s)[/green]")
        if not report.drift:
            out.print("[green]no drift[/green]")
        for d in report.drift:
            out.print(
                f"[red]{d.problem}[/red] {d.document or d.document_id} {d.index_node_id or ''}"
            )
        for d, why in report.not_repaired:
            out.print(f"[yellow]not repaired[/yellow] {d.document or d.document_id}: {why}")
        if report.hint:
            out.print(f"[yellow]{report.hint}[/yellow]")
    if report.drift:
        raise typer.Exit(1)
