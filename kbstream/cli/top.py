"""`kbstream top`: what a person watches during a big import. Per stage: its
group's lag, events/s (from its committed offsets), segments/s (from the
database), dead letters; then documents by status and the oldest pending.
Read from the broker and the database, so it needs no metrics port."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from kbstream.cli.common import HomeOpt, app, cli_session, cli_settings, fail, out

if TYPE_CHECKING:
    from confluent_kafka import Consumer
    from rich.console import Group

    from infra.db.database import Database
    from kbstream.lag import GroupLag, LagReader


class DeadLetterTally:
    """Dead letters per stage, read incrementally from the DLQ topic (no group)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Consumer

        from infra.kafka.security import client_config

        self.topic = topic
        self.counts: dict[str, int] = {}
        self._consumer: Consumer = Consumer(
            client_config(
                bootstrap,
                **{
                    "group.id": "kbstream-top",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                },
            )
        )
        self._assigned = False

    def read(self) -> dict[str, int]:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        from infra.kafka import headers

        if not self._assigned:
            md = self._consumer.list_topics(self.topic, timeout=5)
            parts = md.topics[self.topic].partitions if self.topic in md.topics else {}
            if not parts:
                return self.counts
            self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
            self._assigned = True
        while batch := self._consumer.consume(500, timeout=0.3):
            for m in batch:
                if m.error() is None:
                    stage = headers.as_dict(m.headers()).get(headers.STAGE) or "?"
                    self.counts[stage] = self.counts.get(stage, 0) + 1
        return self.counts

    def close(self) -> None:
        self._consumer.close()


@dataclass
class Reading:
    at: float
    lag: dict[str, GroupLag]
    segments: dict[str, int]
    documents: dict[str, int]
    oldest_pending: float
    dead_letters: dict[str, int]


class TopView:
    def __init__(
        self,
        stages: dict[str, tuple[str, list[str]]],
        lag: LagReader,
        db: Database,
        dead: DeadLetterTally,
    ) -> None:
        self.stages = stages
        self.lag = lag
        self.db = db
        self.dead = dead
        self.last: Reading | None = None

    def read(self) -> Reading:
        from kbstream.observability import segment_progress, status_snapshot

        snap = status_snapshot(self.db)
        return Reading(
            time.monotonic(),
            self.lag.read(),
            segment_progress(self.db),
            snap.documents,
            snap.oldest_pending_seconds,
            dict(self.dead.read()),
        )

    def frame(self) -> Group:
        """A new reading, with rates against the previous one."""
        from rich.console import Group
        from rich.table import Table

        now, prev = self.read(), self.last
        self.last = now
        dt = (now.at - prev.at) if prev else 0.0

        def rate(a: int, b: int | None) -> str:
            return f"{(a - b) / dt:.1f}" if prev is not None and b is not None and dt > 0 else "-"

        table = Table("stage", "group", "lag", "events/s", "segments/s", "dead letters")
        for stage, (group, _) in self.stages.items():
            g = now.lag[group]
            p = prev.lag.get(group) if prev else None
            seg = now.segments.get(stage)
            table.add_row(
                stage,
                group,
                str(g.lag),
                rate(g.committed, p.committed if p else None),
                rate(seg, prev.segments.get(stage)) if seg is not None and prev else "-",
                str(now.dead_letters.get(stage, 0)),
            )
        docs = ", ".join(f"{s} {n}" for s, n in sorted(now.documents.items())) or "none"
        return Group(
            table,
            f"documents: {docs}",
            f"oldest pending: {now.oldest_pending:.0f}s"
            if now.oldest_pending
            else "oldest pending: none",
        )


@app.command()
def top(
    home: HomeOpt = None,
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between readings")] = 2.0,
    once: Annotated[bool, typer.Option(help="print one frame (two readings) and exit")] = False,
) -> None:
    """Live view of lag, throughput and errors per stage (broker and database)."""
    from infra.kafka.topics import Topics
    from kbstream.lag import LagReader
    from kbstream.observability import stage_groups

    settings = cli_settings(home)
    if not settings.brokers:
        fail("no broker: set KBSTREAM_BROKERS or run `kbstream up` first")
    stages = stage_groups(settings)
    lag = LagReader(settings.brokers, dict(stages.values()))
    dead = DeadLetterTally(settings.brokers, Topics(settings.topic_prefix).dlq)
    try:
        with cli_session(home, settings=settings) as (_, c):
            view = TopView(stages, lag, c.database, dead)
            if once:
                view.last = view.read()
                time.sleep(interval)
                out.print(view.frame())
                return
            from rich.live import Live

            with Live(view.frame(), console=out, auto_refresh=False) as live:
                while True:
                    time.sleep(interval)
                    live.update(view.frame(), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        lag.close()
        dead.close()
