"""Running the pipeline: stage workers as threads of this process (the
embedded default and `kbstream up`), and finding the broker a verb should use.

Order of preference for a broker: KBSTREAM_BROKERS; else a running
`kbstream up` for the same home (home/stack.json); else an embedded tansu
broker started for the duration of the command.

What `kbstream up` starts and records (StackInfo, MilvusLiteServer,
EmbeddedStack) lives in kbstream.processes; the names are re-exported here."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from consumers.pipeline import STAGES, stage_spec
from infra.kafka.broker import EmbeddedBroker
from infra.kafka.runner import StageRunner, run_until_stopped
from infra.kafka.topics import ensure_topics
from kbstream import journal
from kbstream.bootstrap import Container
from kbstream.processes import (
    EmbeddedStack,
    MilvusLiteServer,
    StackError,
    StackInfo,
    apply_running_stack,
)
from kbstream.settings import Settings

log = logging.getLogger(__name__)

# how long the stage threads wait for a local model to load before starting anyway
MODEL_LOAD_WAIT_S = 30.0

__all__ = [
    "BrokerLocation",
    "EmbeddedStack",
    "MilvusLiteServer",
    "StackError",
    "StackInfo",
    "WorkerPool",
    "apply_running_stack",
    "broker_for",
]


class WorkerPool:
    """Every requested stage as its own consumer group, one thread each."""

    def __init__(
        self,
        container: Container,
        bootstrap: str,
        stages: Sequence[str] = STAGES,
        exclusive: bool = False,
    ) -> None:
        self.container = container
        self.bootstrap = bootstrap
        self.exclusive = exclusive
        self.stages = list(stages)
        self.runners: list[StageRunner] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> WorkerPool:
        s = self.container.settings
        specs = [stage_spec(name) for name in self.stages]
        if any(spec.extracts for spec in specs):
            from infra.extract.isolated import start_forkserver

            start_forkserver()
        warm = None
        if any(spec.needs_model for spec in specs):
            # the model is on the critical path: load it first
            warm = threading.Thread(target=self._warm_up, name="warm-up", daemon=True)
            warm.start()
        ensure_topics(self.bootstrap, self.container.topics, s.partitions, s.replication_factor)
        if warm is not None and self.container.remote_embedding is None:
            # Importing a local model is ~4 s of Python that needs the GIL; beside
            # the parse, split and keyword threads it took 12-18 s (each file read
            # hands the GIL to them), and no text can be embedded before it ends.
            # The stages start after it: they have the first segments ready in <1 s.
            warm.join(timeout=MODEL_LOAD_WAIT_S)
        for name in self.stages:
            runner = self.container.runner(name, self.bootstrap, exclusive=self.exclusive)
            t = threading.Thread(
                target=run_until_stopped, args=(runner,), name=f"stage-{name}", daemon=True
            )
            self.runners.append(runner)
            self.threads.append(t)
            t.start()
        return self

    def _warm_up(self) -> None:
        try:
            self.container.provider.warm_up()
        except Exception:  # the embed stage reports the real error when it needs the model
            log.warning("embedding model warm-up failed", exc_info=True)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(r.ready.wait(max(0.0, deadline - time.monotonic())) for r in self.runners)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def stop(self, timeout: float = 30.0) -> None:
        for r in self.runners:
            r.stop()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))


@dataclass
class BrokerLocation:
    bootstrap: str
    embedded: bool  # True: this process must run the workers itself
    journal: Path | None = None  # the embedded broker's journal (kbstream.journal)


def runs_own_workers(settings: Settings) -> bool:
    """Will a one-shot verb start its own broker and stage workers (no
    KBSTREAM_BROKERS, no live `kbstream up`)? Then this process's settings, its
    embedding model included, are the workers'."""
    return not settings.brokers and StackInfo.read_live(settings.home) is None


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[BrokerLocation]:
    """The broker this command talks to; starts an embedded one if none. A
    broker started here first gets what the home's journal holds (events an
    earlier broker acknowledged and nobody finished), and at the end the
    journal keeps only what is still unfinished."""
    if settings.brokers:
        yield BrokerLocation(settings.brokers, embedded=False, journal=settings.broker_journal)
        return
    info = StackInfo.read_live(settings.home)
    if info is not None:
        yield BrokerLocation(info.brokers, embedded=False, journal=info.journal_path)
        return
    settings.home.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(log_file=settings.home / "broker.log").start()
    try:
        path = journal.take_over(settings, broker.bootstrap)
        yield BrokerLocation(broker.bootstrap, embedded=True, journal=path)
        # the workers stopped and committed: keep what they did not finish
        journal.upkeep(
            settings.model_copy(update={"broker_journal": path}), broker.bootstrap, replay=False
        )
    finally:
        broker.stop()
