"""`kbstream rebuild`: rebuild a dataset's vector and keyword indexes from the
stored segments, or switch its embedding model (blue/green)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from domain.errors import KbstreamError

if TYPE_CHECKING:
    from kbstream.rebuild import ProgressFn, RebuildSummary
from kbstream.cli.common import (
    DatasetOpt,
    HomeOpt,
    JsonOpt,
    app,
    cli_session,
    err,
    fail,
    out,
    print_json,
)


@app.command()
def rebuild(
    dataset: DatasetOpt,
    model: Annotated[
        str | None,
        typer.Option(help="embedding model folder to switch to (default: the configured one)"),
    ] = None,
    grace: Annotated[
        float | None,
        typer.Option(
            help="seconds the previous index is kept after a switch "
            "(default KBSTREAM_RETIRED_GRACE_SECONDS)"
        ),
    ] = None,
    drop_retired: Annotated[
        bool, typer.Option("--drop-retired", help="drop retired indexes past their grace period")
    ] = False,
    now: Annotated[bool, typer.Option("--now", help="with --drop-retired: do not wait")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild DATASET's vectors and keyword index from its stored segments
    (searches keep answering meanwhile); with --model, switch its embedding model."""
    from kbstream.rebuild import drop_retired as run_drop
    from kbstream.rebuild import rebuild as run_rebuild

    with cli_session(home) as (_, c):
        try:
            if drop_retired:
                dropped = run_drop(c, dataset, now)
                if as_json:
                    print_json({"dataset": dataset, "dropped": dropped})
                else:
                    out.print(f"{dataset}: dropped {len(dropped)} retired index(es)")
                    for d in dropped:
                        gone = ", collection dropped" if d["collection_dropped"] else ""
                        out.print(f"  {d['model']} in {d['collection']}{gone}")
                return
            summary = _with_progress(lambda p: run_rebuild(c, dataset, model, grace, p), as_json)
        except (KbstreamError, LookupError) as exc:
            fail(str(exc))
    if as_json:
        print_json(summary.to_dict())
    else:
        out.print(summary.line())


def _with_progress(
    work: Callable[[ProgressFn | None], RebuildSummary], quiet: bool
) -> RebuildSummary:
    """A progress bar on a terminal; nothing otherwise."""
    if quiet or not err.is_terminal:
        return work(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("rebuild"), BarColumn(), MofNCompleteColumn(), console=err, transient=True
    ) as bar:
        task = bar.add_task("segments", total=None)

        def step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return work(step)
