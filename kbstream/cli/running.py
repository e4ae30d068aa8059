"""`kbstream up`, `worker`, `publish` and `schema`: running the pipeline and
talking to it."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from consumers.pipeline import STAGES, Scaling, scaled, stage_spec
from domain.errors import KbstreamError
from kbstream.cli.common import (
    HomeOpt,
    RuntimeOpt,
    app,
    cli_session,
    cli_settings,
    err,
    fail,
    print_json,
    stop_on_signals,
    use_runtime,
)

if TYPE_CHECKING:
    from kbstream.bootstrap import Container
    from kbstream.processes import EmbeddedStack
    from kbstream.settings import Settings
    from kbstream.stack import WorkerPool


@app.command()
def worker(
    stage: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGES)}")],
    home: HomeOpt = None,
    runtime: RuntimeOpt = None,
) -> None:
    """Run one stage's consumer group (what a pod runs). Needs KBSTREAM_BROKERS."""
    from infra.kafka.runner import run_until_stopped
    from infra.kafka.topics import ensure_topics
    from kbstream.observability import start_observability

    if stage not in STAGES:
        fail(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    use_runtime(runtime)
    settings = cli_settings(home, quiet=False)
    if not settings.brokers:
        fail("KBSTREAM_BROKERS is not set and no `kbstream up` is running for this home")
    brokers = settings.brokers
    with cli_session(home, settings=settings) as (_, c):
        ensure_topics(brokers, c.topics, settings.partitions, settings.replication_factor)
        runner = c.runner(stage, brokers)
        start_observability(settings, c, brokers, [stage])
        stop_on_signals(runner.stop)
        if stage_spec(stage).needs_model:
            _warm_up(c)
        run_until_stopped(runner)


def _warm_up(c: Container) -> None:
    """Load the model while the group is joined: it is on the critical path otherwise."""
    import logging

    def load() -> None:
        try:
            c.provider.warm_up()
        except Exception:  # the stage reports the real error when it needs the model
            logging.getLogger(__name__).warning("embedding model warm-up failed", exc_info=True)

    threading.Thread(target=load, name="warm-up", daemon=True).start()


WORKERS_HELP = (
    "run these stages as N worker processes each (members of the stage's consumer "
    "group, like pods) instead of threads of this process, e.g. "
    "--workers parse=2,split=2,index_keywords=2,embed=1; or auto "
    f"({', '.join(scaled(Scaling.PROCESSES))}: max(1, min(partitions, cpus // 4)) each; "
    f"{', '.join(scaled(Scaling.ONE_PROCESS))}: 1). "
    "A worker that dies is restarted with backoff"
)


@app.command()
def up(
    home: HomeOpt = None,
    stages: Annotated[str, typer.Option(help="comma-separated stages to run")] = ",".join(STAGES),
    workers: Annotated[
        str | None, typer.Option("--workers", metavar="STAGE=N,...|auto", help=WORKERS_HELP)
    ] = None,
    runtime: RuntimeOpt = None,
) -> None:
    """Run the embedded stack until interrupted: broker, Milvus server, every stage.

    Stages run as threads of this process unless --workers makes them processes:

        kbstream up --workers parse=2,split=2,index_keywords=2
    """
    # not kbstream.stack or .observability yet: they import prometheus_client,
    # which reads PROMETHEUS_MULTIPROC_DIR once, on import
    from kbstream.supervisor import (
        MULTIPROC_ENV,
        WorkersSpecError,
        WorkerSupervisor,
        fresh_metrics_dir,
        parse_workers,
    )

    use_runtime(runtime)  # before the settings, and inherited by worker processes
    # not the running stack's settings: this command is the running stack
    settings = cli_settings(home, quiet=False, running_stack=False)
    wanted = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        fail(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    try:
        counts = parse_workers(workers, wanted, partitions=settings.partitions) if workers else {}
    except WorkersSpecError as exc:
        fail(str(exc))
    threads = [s for s in wanted if s not in counts]
    metrics_dir = None
    if counts and settings.metrics_port:  # one port for this process and its workers
        metrics_dir = fresh_metrics_dir(settings.home)
        os.environ[MULTIPROC_ENV] = str(metrics_dir)

    from kbstream.observability import start_observability
    from kbstream.stack import EmbeddedStack, StackError

    stop = threading.Event()
    stop_on_signals(stop.set)
    try:
        with (
            EmbeddedStack(settings) as stack,
            cli_session(home, settings=stack.settings) as (_, c),
        ):
            pool = _start_pool(stack, c, threads)
            if pool is None:  # a child died during start-up: that is the news
                reason = stack.dead_child()
            else:
                supervisor = WorkerSupervisor(
                    counts, _worker_env(stack.settings), metrics_dir=metrics_dir
                )
                start_observability(stack.settings, c, stack.bootstrap, threads, supervisor)
                try:
                    supervisor.start()
                    procs = ", ".join(f"{s}={n}" for s, n in counts.items())
                    err.print(
                        f"kbstream up: broker {stack.bootstrap}, milvus {stack.milvus_uri}"
                        + (f"; worker processes {procs}" if procs else "")
                        + "; Ctrl-C stops"
                    )

                    def healthy() -> bool:
                        supervisor.poll()  # dead worker processes are restarted, not fatal
                        return pool.alive()

                    reason = stack.wait(stop, healthy)
                finally:
                    supervisor.stop()  # before the broker and Milvus server go
                    pool.stop()
    except StackError as exc:
        fail(str(exc))
    if reason:
        fail(reason, 1)


def _start_pool(stack: EmbeddedStack, c: Container, threads: list[str]) -> WorkerPool | None:
    """The stage threads; None when starting them failed because the broker or
    the Milvus server died meanwhile (the client error it causes is not news)."""
    from kbstream.stack import WorkerPool

    try:
        return WorkerPool(c, stack.bootstrap, threads).start()
    except Exception:
        if stack.dead_child() is None:
            raise
        return None


def _worker_env(settings: Settings) -> dict[str, str]:
    """This process's environment, pointed at the stack it runs."""
    import os

    env = dict(os.environ)
    env.update(
        KBSTREAM_HOME=str(settings.home),
        KBSTREAM_BROKERS=settings.brokers or "",
        KBSTREAM_MILVUS_URI=settings.vector_uri,
        KBSTREAM_DATABASE_URL=settings.db_url,
    )
    env.pop("KBSTREAM_BROKER_JOURNAL", None)
    if settings.broker_journal is not None:  # the embedded broker: workers journal too
        env["KBSTREAM_BROKER_JOURNAL"] = str(settings.broker_journal)
    return env


@app.command()
def publish(
    file: Annotated[
        Path | None, typer.Argument(help="JSON file with one event or a list; - or none for stdin")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Publish lifecycle events (JSON) to the lifecycle topic."""
    from domain.events import decode_lifecycle_event
    from infra.kafka.topics import Topics
    from kbstream.journal import writer_for
    from producers.client import LifecyclePublisher

    settings = cli_settings(home)
    raw = sys.stdin.read() if file is None or str(file) == "-" else file.read_text()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        fail(f"not valid JSON: {exc}")
    items = data if isinstance(data, list) else [data]
    try:
        events = [decode_lifecycle_event(i) for i in items]
    except KbstreamError as exc:
        fail(str(exc))
    # settings already point at a running `kbstream up` when there is one; an
    # embedded broker started just for this would forget the events at once
    if not settings.brokers:
        fail("no broker: set KBSTREAM_BROKERS or run `kbstream up` first")
    pub = LifecyclePublisher(
        settings.brokers,
        Topics(settings.topic_prefix),
        settings.max_event_bytes,
        journal=writer_for(settings, settings.brokers),
    )
    try:
        for e in events:
            pub.publish(e)
        pub.flush()  # journaled (embedded broker) before it returns
    finally:
        pub.close()
    print_json(
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
