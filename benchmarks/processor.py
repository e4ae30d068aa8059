"""The batch processor's own cost per event, without a broker or a model.

One command, from the repository root:

    .venv/bin/python benchmarks/processor.py [--events N] [--batch B] [--partitions P]
                                             [--repeat K] [--db URL]

The real BatchProcessor (infra/kafka/processor.py) over the in-memory source and
sink (infra/kafka/memory.py), a stage that emits one event per event it is handed
(decoding, retry bookkeeping, publishing and committing are all real), and the
real SQL delivery log (infra/db/deliveries.py) on a fresh SQLite file (or --db).
Three ways of counting deliveries, each run --repeat times, medians printed:

    every-batch   one delivery-log upsert per batch, as before issue 17 (emulated:
                  every partition is treated as just assigned before each batch)
    assignment    what the processor does: count the first batch after an
                  assignment (and a batch at its first failure), nothing after
    none          no delivery log at all: the floor

See benchmarks/README.md (*The batch processor*).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from consumers.contract import StageResult  # noqa: E402
from domain.events import DocumentCreated, DocumentParsed, Event, Topic  # noqa: E402
from infra.db.database import Database  # noqa: E402
from infra.db.deliveries import SqlDeliveryLog  # noqa: E402
from infra.db.engine import create_db_engine, migrate  # noqa: E402
from infra.kafka.memory import MemoryBroker, MemorySink, MemorySource  # noqa: E402
from infra.kafka.processor import BatchProcessor  # noqa: E402
from infra.kafka.retry import RetryPolicy  # noqa: E402
from infra.kafka.topics import Topics  # noqa: E402

TOPICS = Topics("bench.")
MODES = ("every-batch", "assignment", "none")


class Relay:
    """A stage that costs next to nothing: one document.parsed per event."""

    name = "relay"

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch

    def handle(self, events: Sequence[Event]) -> StageResult:
        result = StageResult()
        for e in events:
            assert isinstance(e, DocumentCreated)
            result.emit(
                Topic.PARSED,
                DocumentParsed(
                    tenant_id=e.tenant_id,
                    dataset_id=e.dataset_id,
                    document_id=e.document_id,
                    version=e.version,
                    source=e.source,
                    text=e.content,
                    chars=len(e.content or ""),
                ),
            )
        return result


def fill(broker: MemoryBroker, events: int) -> None:
    for i in range(events):
        broker.publish(
            TOPICS.lifecycle,
            DocumentCreated(
                tenant_id="t",
                dataset_id="d",
                document_id=f"doc-{i}",
                version=1,
                source=f"doc-{i}.txt",
                content=f"a small document, number {i}",
            ),
        )


def run_once(mode: str, args: argparse.Namespace, url: str, group: str) -> dict[str, float]:
    broker = MemoryBroker(partitions=args.partitions)
    fill(broker, args.events)
    log = None
    if mode != "none":
        db = Database(create_db_engine(url))
        log = SqlDeliveryLog(db)
    source = MemorySource(broker, group, [TOPICS.lifecycle], args.batch)
    processor = BatchProcessor(
        Relay(args.batch),
        TOPICS,
        source,
        MemorySink(broker),
        lambda *_: None,
        dlq_topic=TOPICS.dlq,
        group_id=group,
        policy=RetryPolicy(),
        stop=threading.Event(),
        deliveries=log,
    )
    source.open(processor)
    parts = source.assignment()
    batches = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while records := processor.next_batch(0.0, 0.0):
        if mode == "every-batch":
            processor.counter.reassigned(parts)
        processor.process(records)
        batches += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if log is not None:
        log.db.dispose()
    assert broker.committed_offsets(group) == {tp: len(broker.log(tp[0])[tp[1]]) for tp in parts}, (
        "not everything was committed"
    )
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "batches": batches,
        "log_writes": processor.counter.writes,
        "us_per_event": 1e6 * wall / args.events,
        "cpu_us_per_event": 1e6 * cpu / args.events,
        "us_per_batch": 1e6 * wall / batches,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=50, help="the stage's max_batch")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--db", default=None, help="a database URL (default: a fresh SQLite file)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbstream-bench-processor-") as tmp:
        url = args.db or f"sqlite:///{tmp}/state.db"
        engine = create_db_engine(url)
        migrate(engine)
        engine.dispose()
        results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for k in range(args.repeat):
            for mode in MODES:  # interleaved, so drift hits every mode alike
                results[mode].append(run_once(mode, args, url, f"bench-{mode}-{k}"))
    summary = {
        mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for mode, runs in results.items()
    }
    print(
        f"{args.events} events, batch {args.batch}, {args.partitions} partitions, "
        f"{'--db' if args.db else 'SQLite'}, median of {args.repeat}",
        file=sys.stderr,
    )
    print(
        f"{'mode':<12} {'s':>7} {'µs/event':>9} {'CPU µs/event':>13} {'µs/batch':>9} {'log writes':>11}"
    )
    for mode, s in summary.items():
        print(
            f"{mode:<12} {s['seconds']:>7.2f} {s['us_per_event']:>9.1f} "
            f"{s['cpu_us_per_event']:>13.1f} {s['us_per_batch']:>9.0f} {s['log_writes']:>11.0f}"
        )
    print(json.dumps({"args": vars(args), "median": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
