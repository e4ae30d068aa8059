"""`kbstream purge`: remove what deleted documents leave behind
(kbstream.purge)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from kbstream.cli.common import DatasetOpt, HomeOpt, JsonOpt, app, cli_session, out, print_json


@app.command()
def purge(
    dataset: DatasetOpt,
    document: Annotated[
        list[str] | None, typer.Option(help="only this deleted document id (repeatable)")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """For the deleted documents of DATASET: blank the tombstone's source and
    error texts and remove their batch-import job records; prune the tenant's
    cached embeddings no segment uses. Live documents are never touched."""
    from kbstream.purge import purge as run_purge

    with cli_session(home) as (_, c):
        report = run_purge(c, dataset, document or None)
    data = report.to_dict()
    if as_json:
        print_json(data)
        return
    table = Table("what", "count")
    table.add_row("deleted documents purged", str(len(report.documents)))
    table.add_row("batch-import job records removed", str(report.jobs_removed))
    table.add_row("cached embeddings removed", str(report.cache_entries_removed))
    out.print(table)
    if report.pending:
        out.print(
            f"{len(report.pending)} deleted document(s) still have segments (their delete is "
            f"still on its way through the pipeline): {', '.join(report.pending[:10])}; "
            "run purge again once it is done"
        )
