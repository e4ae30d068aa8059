"""`kbstream index` and `kbstream sync`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from domain.errors import KbstreamError
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

if TYPE_CHECKING:
    from domain.events import ProcessRule
    from kbstream.indexing import IndexSummary

PathsArg = Annotated[list[Path], typer.Argument(help="files and folders (recursed)")]
ForceOpt = Annotated[bool, typer.Option(help="republish unchanged files too")]
TimeoutOpt = Annotated[float | None, typer.Option(help="give up after this many seconds")]
MaxTokensOpt = Annotated[
    int | None, typer.Option("--max-tokens", help="custom rule: chunk size in model tokens")
]
OverlapOpt = Annotated[
    int | None,
    typer.Option(
        "--chunk-overlap", help="custom rule: overlap in tokens, at most half of --max-tokens"
    ),
]
SeparatorOpt = Annotated[
    str | None, typer.Option("--separator", help="custom rule: hard chunk boundary, e.g. '\\n\\n'")
]
UrlsOpt = Annotated[
    bool, typer.Option("--remove-urls-emails", help="cleaning: drop URLs and e-mail addresses")
]
FormOpt = Annotated[str, typer.Option("--doc-form", help="text | qa | parent_child")]
ByReferenceOpt = Annotated[
    bool,
    typer.Option(
        "--by-reference",
        help="publish file:// references instead of uploading the files into the database; "
        "every parse worker's KBSTREAM_ALLOWED_ROOTS must cover them",
    ),
]


@app.command()
def index(
    paths: PathsArg,
    dataset: DatasetOpt,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    timeout: TimeoutOpt = None,
    max_tokens: MaxTokensOpt = None,
    chunk_overlap: OverlapOpt = None,
    separator: SeparatorOpt = None,
    remove_urls_emails: UrlsOpt = False,
    doc_form: FormOpt = "text",
    by_reference: ByReferenceOpt = False,
) -> None:
    """Index files and folders into DATASET and wait until every document is done.
    Processing options apply to the documents published by this run (use
    --force to re-split unchanged files with new options)."""
    rule = _rule(max_tokens, chunk_overlap, separator, remove_urls_emails)
    _run_indexing(
        paths, dataset, home, as_json, force, timeout, "incremental", rule, doc_form, by_reference
    )


@app.command()
def sync(
    paths: PathsArg,
    dataset: DatasetOpt,
    cleanup: Annotated[str, typer.Option(help="none | incremental | full")] = "incremental",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    timeout: TimeoutOpt = None,
    max_tokens: MaxTokensOpt = None,
    chunk_overlap: OverlapOpt = None,
    separator: SeparatorOpt = None,
    remove_urls_emails: UrlsOpt = False,
    doc_form: FormOpt = "text",
    by_reference: ByReferenceOpt = False,
) -> None:
    """Make DATASET match PATHS: add new files, update changed ones and, with
    --cleanup full, delete documents whose files are gone."""
    if cleanup not in ("none", "incremental", "full"):
        fail(f"--cleanup must be none, incremental or full, not {cleanup!r}")
    rule = _rule(max_tokens, chunk_overlap, separator, remove_urls_emails)
    _run_indexing(
        paths, dataset, home, as_json, force, timeout, cleanup, rule, doc_form, by_reference
    )


def _rule(
    max_tokens: int | None, overlap: int | None, separator: str | None, urls: bool
) -> ProcessRule:
    from pydantic import ValidationError

    from domain.events import ProcessRule

    custom = any(v is not None for v in (max_tokens, overlap, separator))
    try:
        return ProcessRule(
            mode="custom" if custom else "automatic",
            max_tokens=max_tokens,
            chunk_overlap=overlap,
            separator=separator,
            remove_urls_emails=urls,
        )
    except ValidationError as exc:  # one line per problem, as the options name them
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        fail(f"invalid processing rule: {problems}")


def _run_indexing(
    paths: list[Path],
    dataset: str,
    home: Path | None,
    as_json: bool,
    force: bool,
    timeout: float | None,
    cleanup: str,
    rule: ProcessRule,
    doc_form: str,
    by_reference: bool = False,
) -> None:
    from domain.events import DocForm

    if doc_form not in {f.value for f in DocForm}:
        fail(f"--doc-form must be text, qa or parent_child, not {doc_form!r}")
    from kbstream.indexing import index_paths

    options: dict[str, Any] = {
        "force": force,
        "timeout": timeout,
        "cleanup": cleanup,
        "rule": rule,
        "doc_form": DocForm(doc_form),
        "by_reference": by_reference,
    }
    with cli_session(home, quiet=True) as (_, container):
        try:
            if as_json or not sys.stderr.isatty():
                summary = index_paths(container, paths, dataset, **options)
            else:
                with _progress_bar() as bar:
                    task = bar.add_task("index", total=None, segments=0)

                    def progress(done: int, total: int, segments: int) -> None:
                        bar.update(task, completed=done, total=total, segments=segments)

                    summary = index_paths(container, paths, dataset, progress=progress, **options)
        except (FileNotFoundError, KbstreamError, TimeoutError, RuntimeError) as exc:
            fail(str(exc))
    _report(summary, as_json)
    if summary.failed:
        raise typer.Exit(1)


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]indexing[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("documents · {task.fields[segments]} segments"),
        TimeElapsedColumn(),
        console=err,
    )


def _report(summary: IndexSummary, as_json: bool) -> None:
    if as_json:
        print_json(summary.to_dict())
        return
    s = summary
    out.print(
        f"{s.documents} files: {s.added} added, {s.updated} updated, "
        f"{s.skipped} unchanged, {s.deleted} deleted · {s.completed} completed, "
        f"{s.failed} failed · {s.segments} segments (+{s.segments_added} "
        f"={s.segments_kept} -{s.segments_removed}) · {s.embedded} embedded, "
        f"{s.cache_hits} cache hits · {s.seconds:.1f}s"
    )
    for e in s.errors:
        out.print(f"[red]error[/red] {e['document']}: {e['error']}")
