"""What every command shares: the Typer app, the consoles, the common
options, and one session (settings, logging, container, close)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from kbstream.settings import Settings, load_settings

if TYPE_CHECKING:
    from kbstream.bootstrap import Container

app = typer.Typer(
    help="kbstream: a streaming indexer that keeps a vector and a keyword index in step with your documents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: an error is one line, whatever the terminal width (scripts grep it)
err = Console(stderr=True, soft_wrap=True)
out = Console()

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="state directory (default ./.kbstream, or KBSTREAM_HOME)"),
]
RuntimeOpt = Annotated[
    str | None,
    typer.Option(
        "--runtime",
        help="confluent (default) or faust: what consumes the stages (or KBSTREAM_RUNTIME)",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="dataset name")]
OptionalDatasetOpt = Annotated[str | None, typer.Option("--dataset", "-d", help="dataset name")]

NOISY_LOGGERS = ("pymilvus", "urllib3", "httpx", "sentence_transformers", "transformers", "faiss")


def load_cli_settings(home: Path | None, running_stack: bool = True) -> Settings:
    """Settings for a command; beside a running `kbstream up` (``running_stack``)
    they point at its broker and Milvus server."""
    from infra.kafka.security import register

    settings = load_settings(home=home)
    if settings.brokers:  # verbs that build no container (publish, dlq, top) too
        register(settings.brokers, settings.kafka_client_properties())
    if not running_stack:  # `up`: kbstream.stack imports prometheus_client, too early for it
        return settings
    from domain.errors import KbstreamError
    from kbstream.stack import apply_running_stack

    try:
        return apply_running_stack(settings)
    except KbstreamError as exc:  # a `kbstream up` still starting, a locked milvus dir
        fail(str(exc))


def setup_logging(settings: Settings, quiet: bool) -> None:
    settings.home.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(settings.log_level.upper())
    from infra.logs import ContextFilter, formatter

    kind = settings.log_format  # json: stage, document, version, event_id on each line
    fh = logging.FileHandler(settings.home / "kbstream.log")
    fh.setFormatter(
        formatter(kind, "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    )
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.WARNING if quiet else settings.log_level.upper())
    sh.setFormatter(formatter(kind, "%(levelname)s %(name)s: %(message)s"))
    root.addHandler(sh)
    for handler in (fh, sh):
        handler.addFilter(ContextFilter())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pymilvus logs every failed call with its traceback before raising it;
    # kbstream classifies each error and logs what it does about it (e.g. two
    # workers creating the same collection at once: the loser finds it exists)
    logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)
    # milvus-lite answers some pymilvus calls with "not implemented"; harmless
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    # librdkafka's connection chatter (e.g. the embedded broker stopping) goes to the file only
    logging.getLogger("rdkafka").propagate = False
    logging.getLogger("rdkafka").addHandler(fh)


def cli_settings(home: Path | None, quiet: bool = True, running_stack: bool = True) -> Settings:
    """Settings with logging set up, for commands that need no container."""
    settings = load_cli_settings(home, running_stack)
    setup_logging(settings, quiet)
    return settings


@contextlib.contextmanager
def cli_session(
    home: Path | None, quiet: bool = True, settings: Settings | None = None
) -> Iterator[tuple[Settings, Container]]:
    """Settings, logging and a container that is closed however the command
    ends (a `fail` inside included). Pass ``settings`` when the command
    already loaded them (logging is then assumed set up)."""
    # imported here: `--help` and `schema` need no adapters
    from kbstream.bootstrap import Container

    if settings is None:
        settings = cli_settings(home, quiet)
    container = Container(settings)
    try:
        yield settings, container
    finally:
        container.close()


def use_runtime(runtime: str | None) -> None:
    """``--runtime`` is KBSTREAM_RUNTIME for this process and the workers it starts."""
    if runtime is None:
        return
    from infra.kafka.runtimes import RUNTIMES  # the one registry of runtimes

    if runtime not in RUNTIMES:
        fail(f"unknown runtime {runtime!r}; runtimes: {', '.join(RUNTIMES)}")
    os.environ["KBSTREAM_RUNTIME"] = runtime


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def stop_on_signals(stop: Callable[[], Any]) -> None:
    def handler(_sig: int, _frame: Any) -> None:
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
