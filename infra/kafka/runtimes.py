"""The runtimes, in one registry: which Source (infra/kafka/source.py) feeds a
stage's loop. The composition root picks one by ``KBSTREAM_RUNTIME``; each
adapter's module is imported only when picked (faust loads aiokafka and more).

    confluent   infra/kafka/confluent_source.py (the default)
    faust       infra/kafka/faust_source.py

The in-memory source (infra/kafka/memory.py) is not here: it has no broker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from consumers.contract import Stage
from infra.kafka.processor import OnGiveUp
from infra.kafka.redelivery import DeliveryLog
from infra.kafka.runner import RunnerConfig, StageRunner
from infra.kafka.source import Sink, Source
from infra.kafka.topics import Topics

# (config, inputs, stage, datadir) -> the source; may adjust the config
SourceFactory = Callable[[RunnerConfig, Sequence[str], Stage, Path | None], Source]


def _confluent(
    config: RunnerConfig, inputs: Sequence[str], stage: Stage, _datadir: Path | None
) -> Source:
    from infra.kafka.confluent_source import ConfluentSource

    return ConfluentSource(config, inputs, stage.max_batch)


def _faust(
    config: RunnerConfig, inputs: Sequence[str], stage: Stage, datadir: Path | None
) -> Source:
    from infra.kafka.faust_source import FaustSource

    return FaustSource(config, inputs, stage.max_batch, stage.name, datadir)


@dataclass(frozen=True)
class Transport:
    source: SourceFactory
    # whether the processor may take the next batch while one is handled
    # (lookahead); faust's agent takes the next batch only after the commit
    takes_ahead: bool


RUNTIMES: dict[str, Transport] = {
    "confluent": Transport(_confluent, takes_ahead=True),
    "faust": Transport(_faust, takes_ahead=False),
}


def stage_runner(
    runtime: str,
    stage: Stage,
    inputs: Sequence[str],
    topics: Topics,
    config: RunnerConfig,
    sink: Sink,
    on_give_up: OnGiveUp,
    deliveries: DeliveryLog | None = None,
    datadir: Path | None = None,
) -> StageRunner:
    """A stage's loop on the runtime named ``runtime`` (``inputs``: physical topics)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; runtimes: {', '.join(sorted(RUNTIMES))}")
    transport = RUNTIMES[runtime]
    if not transport.takes_ahead:
        config = dataclasses.replace(config, lookahead=False)
    source = transport.source(config, inputs, stage, datadir)
    return StageRunner(stage, topics, config, source, sink, on_give_up, deliveries, runtime=runtime)
