"""The `kbstream` command. Thin: parse arguments, call the service layer,
print a table or JSON."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from consumers import STAGES
from domain.errors import KbstreamError
from kbstream.bootstrap import Container
from kbstream.settings import Settings, load_settings

app = typer.Typer(
    help="kbstream: a streaming indexer that keeps a vector and a keyword index in step with your documents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="state directory (default ./.kbstream, or KBSTREAM_HOME)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="dataset name")]


def _settings(home: Path | None) -> Settings:
    from kbstream.stack import apply_running_stack

    return apply_running_stack(load_settings(home=home))


def _setup_logging(settings: Settings, quiet: bool) -> None:
    settings.home.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(settings.log_level.upper())
    fh = logging.FileHandler(settings.home / "kbstream.log")
    fh.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    )
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.WARNING if quiet else settings.log_level.upper())
    sh.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(sh)
    for noisy in ("pymilvus", "urllib3", "httpx", "sentence_transformers", "transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # milvus-lite answers some pymilvus calls with "not implemented"; harmless
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    # librdkafka's connection chatter (e.g. the embedded broker stopping) goes to the file only
    logging.getLogger("rdkafka").propagate = False
    logging.getLogger("rdkafka").addHandler(fh)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


MaxTokensOpt = Annotated[
    int | None, typer.Option("--max-tokens", help="custom rule: chunk size in model tokens")
]
OverlapOpt = Annotated[
    int | None, typer.Option("--chunk-overlap", help="custom rule: overlap in tokens")
]
SeparatorOpt = Annotated[
    str | None, typer.Option("--separator", help="custom rule: hard chunk boundary, e.g. '\\n\\n'")
]
UrlsOpt = Annotated[
    bool, typer.Option("--remove-urls-emails", help="cleaning: drop URLs and e-mail addresses")
]
FormOpt = Annotated[str, typer.Option("--doc-form", help="text | qa | parent_child")]


def _rule(max_tokens: int | None, overlap: int | None, separator: str | None, urls: bool) -> Any:
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
    except ValueError as exc:
        _fail(f"invalid processing rule: {exc}")


def _run_indexing(
    paths: list[Path],
    dataset: str,
    home: Path | None,
    as_json: bool,
    force: bool,
    timeout: float | None,
    cleanup: str,
    rule: Any = None,
    doc_form: str = "text",
) -> None:
    from domain.events import DocForm
    from kbstream.indexing import index_paths

    if doc_form not in {f.value for f in DocForm}:
        _fail(f"--doc-form must be text, qa or parent_child, not {doc_form!r}")

    settings = _settings(home)
    _setup_logging(settings, quiet=True)
    container = Container(settings)
    try:
        if as_json or not sys.stderr.isatty():
            summary = index_paths(
                container,
                paths,
                dataset,
                force=force,
                timeout=timeout,
                cleanup=cleanup,  # type: ignore[arg-type]
                rule=rule,
                doc_form=DocForm(doc_form),
            )
        else:
            with Progress(
                TextColumn("[bold]indexing[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("documents · {task.fields[segments]} segments"),
                TimeElapsedColumn(),
                console=err,
            ) as bar:
                task = bar.add_task("index", total=None, segments=0)

                def progress(done: int, total: int, segments: int) -> None:
                    bar.update(task, completed=done, total=total, segments=segments)

                summary = index_paths(
                    container,
                    paths,
                    dataset,
                    force=force,
                    timeout=timeout,
                    progress=progress,
                    cleanup=cleanup,  # type: ignore[arg-type]
                    rule=rule,
                    doc_form=DocForm(doc_form),
                )
    except (FileNotFoundError, KbstreamError, TimeoutError, RuntimeError) as exc:
        _fail(str(exc))
        return
    finally:
        container.close()
    if as_json:
        _print_json(summary.to_dict())
    else:
        out.print(
            f"{summary.documents} files: {summary.added} added, {summary.updated} updated, "
            f"{summary.skipped} unchanged, {summary.deleted} deleted · {summary.completed} completed, "
            f"{summary.failed} failed · {summary.segments} segments (+{summary.segments_added} "
            f"={summary.segments_kept} -{summary.segments_removed}) · {summary.embedded} embedded, "
            f"{summary.cache_hits} cache hits · {summary.seconds:.1f}s"
        )
        for e in summary.errors:
            out.print(f"[red]error[/red] {e['document']}: {e['error']}")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def index(
    paths: Annotated[list[Path], typer.Argument(help="files and folders (recursed)")],
    dataset: DatasetOpt,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    force: Annotated[bool, typer.Option(help="republish unchanged files too")] = False,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
    max_tokens: MaxTokensOpt = None,
    chunk_overlap: OverlapOpt = None,
    separator: SeparatorOpt = None,
    remove_urls_emails: UrlsOpt = False,
    doc_form: FormOpt = "text",
) -> None:
    """Index files and folders into DATASET and wait until every document is done.
    Processing options apply to the documents published by this run (use
    --force to re-split unchanged files with new options)."""
    rule = _rule(max_tokens, chunk_overlap, separator, remove_urls_emails)
    _run_indexing(paths, dataset, home, as_json, force, timeout, "incremental", rule, doc_form)


@app.command()
def sync(
    paths: Annotated[list[Path], typer.Argument(help="files and folders (recursed)")],
    dataset: DatasetOpt,
    cleanup: Annotated[str, typer.Option(help="none | incremental | full")] = "incremental",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    force: Annotated[bool, typer.Option(help="republish unchanged files too")] = False,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
    max_tokens: MaxTokensOpt = None,
    chunk_overlap: OverlapOpt = None,
    separator: SeparatorOpt = None,
    remove_urls_emails: UrlsOpt = False,
    doc_form: FormOpt = "text",
) -> None:
    """Make DATASET match PATHS: add new files, update changed ones and, with
    --cleanup full, delete documents whose files are gone."""
    if cleanup not in ("none", "incremental", "full"):
        _fail(f"--cleanup must be none, incremental or full, not {cleanup!r}")
    rule = _rule(max_tokens, chunk_overlap, separator, remove_urls_emails)
    _run_indexing(paths, dataset, home, as_json, force, timeout, cleanup, rule, doc_form)


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
        _fail(f"--mode must be vector, keyword or hybrid, not {mode!r}")
    settings = _settings(home)
    _setup_logging(settings, quiet=True)
    container = Container(settings)
    try:
        hits = run_search(container, dataset, query, mode, top_k)  # type: ignore[arg-type]
    except KbstreamError as exc:
        _fail(str(exc))
        return
    finally:
        container.close()
    if as_json:
        _print_json([h.to_dict() for h in hits])
        return
    table = Table("score", "document", "content")
    for h in hits:
        text = h.content if len(h.content) < 200 else h.content[:200] + "…"
        table.add_row(f"{h.score:.4f}", Path(h.document).name, text)
    out.print(table)


@app.command()
def stats(dataset: DatasetOpt, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Counts for DATASET: documents, segments, vectors, postings, cache."""
    settings = _settings(home)
    _setup_logging(settings, quiet=True)
    c = Container(settings)
    try:
        provider, model, _ = c.model_identity
        by_status = c.db.documents.status_counts(settings.tenant, dataset)
        data = {
            "dataset": dataset,
            "documents": sum(v for k, v in by_status.items() if k != "deleted"),
            "segments": c.db.segments.count(settings.tenant, dataset),
            "vectors": c.vectors.count(settings.tenant, dataset),
            "keyword_postings": c.db.postings.count(settings.tenant, dataset),
            "cached_embeddings": c.db.embeddings.count(provider, model),
            "by_status": by_status,
            "embedding_model": f"{provider}/{model}",
            "collection": c.vectors.collection,
        }
    finally:
        c.close()
    if as_json:
        _print_json(data)
        return
    table = Table("what", "count")
    for k, v in data.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    out.print(table)


@app.command()
def status(
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="dataset name")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    document: Annotated[str | None, typer.Option(help="one document id")] = None,
    job: Annotated[str | None, typer.Option(help="one batch-import job id")] = None,
) -> None:
    """One row per document of DATASET (status, error, segments), one
    document, or one batch-import job."""
    settings = _settings(home)
    _setup_logging(settings, quiet=True)
    c = Container(settings)
    if job is not None:
        try:
            row = c.db.jobs.get(job)
        finally:
            c.close()
        if row is None:
            _fail(f"no batch-import job {job!r}", 1)
            return
        if as_json:
            _print_json(row)
        else:
            table = Table("field", "value")
            for k, v in row.items():
                table.add_row(k, str(v))
            out.print(table)
        return
    if dataset is None:
        if document is None:
            c.close()
            _fail("give --dataset, --document or --job")
            return
        try:
            found = c.db.documents.find(settings.tenant, document)
        finally:
            c.close()
        if not found:
            _fail(f"no document {document!r}", 1)
        if len(found) > 1:
            _fail(
                f"document {document!r} is in several datasets: {', '.join(d.dataset_id for d in found)}; add --dataset"
            )
        dataset = found[0].dataset_id
        c = Container(settings)
    try:
        docs = c.db.documents.list(settings.tenant, dataset, [document] if document else None)
    finally:
        c.close()
    rows = [
        {
            "document": d.source,
            "document_id": d.document_id,
            "dataset": d.dataset_id,
            "status": d.status.value,
            "error": d.error,
            "segments": d.segment_count,
            "version": d.version,
            "embedded": d.embedded_texts,
            "cache_hits": d.cache_hits,
            "segments_added": d.segments_added,
            "segments_kept": d.segments_kept,
            "segments_removed": d.segments_removed,
            "updated_at": d.updated_at,
            "completed_at": d.completed_at,
        }
        for d in docs
    ]
    if document and not rows:
        _fail(f"no document {document!r} in dataset {dataset!r}", 1)
    if as_json:
        _print_json(rows[0] if document else rows)
        return
    table = Table("document", "status", "segments", "error")
    for r in rows:
        color = {"completed": "green", "error": "red"}.get(str(r["status"]), "yellow")
        table.add_row(
            str(r["document"]),
            f"[{color}]{r['status']}[/{color}]",
            str(r["segments"]),
            r["error"] or "",
        )
    out.print(table)


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
    """Check that segments, vectors and keyword postings agree, document by
    document; with --repair, fix what differs. Exit 1 if drift remains."""
    from kbstream.verify import repair as run_repair
    from kbstream.verify import verify as run_verify

    settings = _settings(home)
    _setup_logging(settings, quiet=True)
    c = Container(settings)
    try:
        report = (
            run_repair(c, dataset, stuck_after) if repair else run_verify(c, dataset, stuck_after)
        )
    except (KbstreamError, TimeoutError, RuntimeError) as exc:
        _fail(str(exc))
        return
    finally:
        c.close()
    data = report.to_dict()
    if as_json:
        _print_json(data)
    else:
        out.print(
            f"{dataset}: {data['documents']} documents, {data['segments']} segments, "
            f"{data['vectors']} vectors, {data['postings_segments']} segments with postings"
        )
        if report.repaired:
            out.print(f"[green]repaired {len(report.repaired)} problem(s)[/green]")
        if not report.drift:
            out.print("[green]no drift[/green]")
        for d in report.drift:
            out.print(
                f"[red]{d.problem}[/red] {d.document or d.document_id} {d.index_node_id or ''}"
            )
    if report.drift:
        raise typer.Exit(1)


dlq_app = typer.Typer(
    help="Dead letters: list them, replay them after a fix.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


def _running_broker(settings: Settings) -> str:
    if not settings.brokers:
        _fail(
            "dead letters live on the broker: set KBSTREAM_BROKERS or run `kbstream up` "
            "(the embedded broker started by `index` forgets them when it stops)"
        )
    assert settings.brokers is not None
    return settings.brokers


@dlq_app.command("list")
def dlq_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Every dead letter with its stage, error and original position."""
    from infra.kafka.topics import Topics
    from kbstream.dlq import list_dead_letters

    settings = _settings(home)
    _setup_logging(settings, quiet=True)
    letters = [
        d.to_dict()
        for d in list_dead_letters(_running_broker(settings), Topics(settings.topic_prefix))
    ]
    if as_json:
        _print_json(letters)
        return
    table = Table("offset", "stage", "original", "error")
    for d in letters:
        table.add_row(
            f"{d['partition']}:{d['offset']}",
            str(d["stage"]),
            f"{d['original_topic']}[{d['original_partition']}]@{d['original_offset']}",
            str(d["error"])[:120],
        )
    out.print(table)


@dlq_app.command("replay")
def dlq_replay(
    stage: Annotated[str | None, typer.Option(help="only dead letters of this stage")] = None,
    dry_run: Annotated[bool, typer.Option(help="list what would be replayed")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Republish dead letters (not replayed before) to their original topic."""
    from infra.kafka.topics import Topics
    from kbstream.dlq import replay_dead_letters

    settings = _settings(home)
    _setup_logging(settings, quiet=True)
    done = replay_dead_letters(
        _running_broker(settings), Topics(settings.topic_prefix), stage, dry_run
    )
    if as_json:
        _print_json(
            {"replayed": len(done), "dry_run": dry_run, "letters": [d.to_dict() for d in done]}
        )
    else:
        out.print(f"{'would replay' if dry_run else 'replayed'} {len(done)} dead letter(s)")


@app.command()
def worker(
    stage: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGES)}")],
    home: HomeOpt = None,
) -> None:
    """Run one stage's consumer group (what a pod runs). Needs KBSTREAM_BROKERS."""
    from infra import metrics
    from infra.kafka.runner import run_until_stopped
    from infra.kafka.topics import ensure_topics

    if stage not in STAGES:
        _fail(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    settings = _settings(home)
    _setup_logging(settings, quiet=False)
    if not settings.brokers:
        _fail("KBSTREAM_BROKERS is not set and no `kbstream up` is running for this home")
    assert settings.brokers is not None
    c = Container(settings)
    ensure_topics(settings.brokers, c.topics, settings.partitions, settings.replication_factor)
    metrics.serve(settings.metrics_port)
    runner = c.runner(stage, settings.brokers)
    _stop_on_signals(runner.stop)
    try:
        run_until_stopped(runner)
    finally:
        c.close()


@app.command()
def up(
    home: HomeOpt = None,
    stages: Annotated[str, typer.Option(help="comma-separated stages to run")] = ",".join(STAGES),
) -> None:
    """Run the embedded stack until interrupted: broker, Milvus server, every stage."""
    from infra import metrics
    from kbstream.stack import MilvusLiteServer, StackInfo, WorkerPool, broker_for

    settings = load_settings(home=home)
    _setup_logging(settings, quiet=False)
    if StackInfo.read_live(settings.home):
        _fail(f"a kbstream up is already running for {settings.home}")
    milvus = None
    if not settings.milvus_uri:
        milvus = MilvusLiteServer(settings.home / "milvus.db").start()
        settings = settings.model_copy(update={"milvus_uri": milvus.uri})
    stop = threading.Event()
    _stop_on_signals(stop.set)
    try:
        with broker_for(settings) as runtime:
            StackInfo(pid=_pid(), brokers=runtime.bootstrap, milvus_uri=settings.vector_uri).write(
                settings.home
            )
            c = Container(settings)
            metrics.serve(settings.metrics_port)
            pool = WorkerPool(
                c, runtime.bootstrap, [s.strip() for s in stages.split(",") if s.strip()]
            ).start()
            err.print(
                f"kbstream up: broker {runtime.bootstrap}, milvus {settings.vector_uri}; Ctrl-C stops"
            )
            while not stop.wait(1.0):
                if not pool.alive():
                    err.print("[red]a stage worker died; stopping[/red]")
                    break
            pool.stop()
            c.close()
    finally:
        StackInfo.path(settings.home).unlink(missing_ok=True)
        if milvus:
            milvus.stop()


@app.command()
def publish(
    file: Annotated[
        Path | None, typer.Argument(help="JSON file with one event or a list; - or none for stdin")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Publish lifecycle events (JSON) to the lifecycle topic."""
    from domain.events import decode_lifecycle_event
    from producers.client import LifecyclePublisher

    settings = _settings(home)
    _setup_logging(settings, quiet=True)
    raw = sys.stdin.read() if file is None or str(file) == "-" else file.read_text()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        _fail(f"not valid JSON: {exc}")
        return
    items = data if isinstance(data, list) else [data]
    try:
        events = [decode_lifecycle_event(i) for i in items]
    except KbstreamError as exc:
        _fail(str(exc))
        return
    from infra.kafka.topics import Topics

    # settings already point at a running `kbstream up` when there is one; an
    # embedded broker started just for this would forget the events at once
    if not settings.brokers:
        _fail("no broker: set KBSTREAM_BROKERS or run `kbstream up` first")
    assert settings.brokers is not None
    pub = LifecyclePublisher(
        settings.brokers, Topics(settings.topic_prefix), settings.max_event_bytes
    )
    for e in events:
        pub.publish(e)
    pub.flush()
    _print_json(
        [
            {
                "event_id": e.event_id,
                "type": e.type,
                "document_id": e.document_id,
                "version": e.version,
            }
            for e in events
        ]
    )


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option(help="write to this file")] = None,
    asyncapi: Annotated[bool, typer.Option(help="the AsyncAPI document instead")] = False,
) -> None:
    """Print the JSON Schema of every event (or the AsyncAPI topic contract)."""
    from domain.events import json_schemas
    from infra.kafka.asyncapi import asyncapi as build_asyncapi

    doc = build_asyncapi() if asyncapi else json_schemas()
    text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)


def _pid() -> int:
    import os

    return os.getpid()


def _stop_on_signals(stop: Any) -> None:
    def handler(_sig: int, _frame: Any) -> None:
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
