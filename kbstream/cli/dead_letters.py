"""`kbstream dlq list` and `kbstream dlq replay`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from kbstream.cli.common import HomeOpt, JsonOpt, app, cli_settings, fail, out, print_json
from kbstream.settings import Settings

dlq_app = typer.Typer(
    help="Dead letters: list them, replay them after a fix.", no_args_is_help=True
)
app.add_typer(dlq_app, name="dlq")


def _running_broker(settings: Settings) -> str:
    if not settings.brokers:
        fail(
            "dead letters live on the broker: set KBSTREAM_BROKERS or run `kbstream up` "
            "(which also brings back those of an earlier embedded broker)"
        )
    return settings.brokers


@dlq_app.command("list")
def dlq_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Every dead letter with its stage, error and original position."""
    from infra.kafka.topics import Topics
    from kbstream.dlq import list_dead_letters

    settings = cli_settings(home)
    letters = [
        d.to_dict()
        for d in list_dead_letters(_running_broker(settings), Topics(settings.topic_prefix))
    ]
    if as_json:
        print_json(letters)
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
    from kbstream.journal import writer_for

    settings = cli_settings(home)
    broker = _running_broker(settings)
    done = replay_dead_letters(
        broker, Topics(settings.topic_prefix), stage, dry_run, writer_for(settings, broker)
    )
    if as_json:
        print_json(
            {"replayed": len(done), "dry_run": dry_run, "letters": [d.to_dict() for d in done]}
        )
    else:
        out.print(f"{'would replay' if dry_run else 'replayed'} {len(done)} dead letter(s)")
