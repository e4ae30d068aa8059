"""The `kbstream` command. Thin: parse arguments, call the service layer
(kbstream.indexing, .search, .verify, .queries, .dlq), print a table or JSON.

One module per concern; importing them registers their commands on `app`."""

from __future__ import annotations

from kbstream.cli import (
    dead_letters,
    indexing,
    inspect,
    operations,
    purge,
    rebuild,
    running,
    serve,
    top,
)
from kbstream.cli.common import app

__all__ = ["app", "main"]

# the modules above register commands when imported
_COMMANDS = (indexing, inspect, dead_letters, operations, purge, running, serve, rebuild, top)


def main() -> None:
    app()
