"""What the broker journal costs a flush: publish batches of stage-sized
events to a real tansu broker and flush each, with and without the journal,
and time the journal's own write (one executemany) per flush.

    .venv/bin/python benchmarks/journal.py [--flushes N] [--sizes 1,32,96] [--bytes B]

Prints a table and one JSON line. Numbers depend on the disk (the journal is
SQLite in WAL mode, synchronous=NORMAL: no fsync per commit)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.kafka.broker import EmbeddedBroker
from infra.kafka.journal import BrokerJournal
from infra.kafka.producer import EventPublisher
from infra.kafka.topics import Topics, ensure_topics


def _run(
    bootstrap: str, topic: str, writer: object, size: int, flushes: int, value: bytes
) -> tuple[list[float], list[float]]:
    """Per-flush wall times and, with a journal, the journal write's share."""
    pub = EventPublisher(bootstrap, journal=writer)  # type: ignore[arg-type]
    appends: list[float] = []
    if writer is not None:  # time the journal write inside flush
        inner = writer.append  # type: ignore[attr-defined]

        def timed(records: object) -> None:
            t0 = time.perf_counter()
            inner(records)
            appends.append(time.perf_counter() - t0)

        writer.append = timed  # type: ignore[attr-defined]
    walls = []
    try:
        for f in range(flushes):
            t0 = time.perf_counter()
            for i in range(size):
                pub.produce_raw(topic, value, key=f"doc-{(f * size + i) % 97}".encode())
            pub.flush()
            walls.append(time.perf_counter() - t0)
    finally:
        pub.close()
    return walls, appends


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flushes", type=int, default=200)
    ap.add_argument("--sizes", default="1,32,96")
    ap.add_argument("--bytes", type=int, default=1500, help="value size (a segments event)")
    args = ap.parse_args()
    value = b"x" * args.bytes
    sizes = [int(s) for s in args.sizes.split(",")]
    result = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        topics = Topics("bench.")
        ensure_topics(broker.bootstrap, topics, partitions=4)
        journal = BrokerJournal(Path(tmp) / "journal.db")
        journal.begin_epoch(broker.bootstrap)
        for size in sizes:
            _run(broker.bootstrap, topics.segments, None, size, 20, value)  # warm up
            plain, _ = _run(broker.bootstrap, topics.segments, None, size, args.flushes, value)
            writer = BrokerJournal(Path(tmp) / "journal.db").writer(broker.bootstrap)
            with_j, appends = _run(
                broker.bootstrap, topics.segments, writer, size, args.flushes, value
            )
            row = {
                "events_per_flush": size,
                "flush_ms_plain_p50": round(statistics.median(plain) * 1000, 3),
                "flush_ms_journaled_p50": round(statistics.median(with_j) * 1000, 3),
                "journal_write_ms_p50": round(statistics.median(appends) * 1000, 3),
                "journal_write_ms_p95": round(statistics.quantiles(appends, n=20)[18] * 1000, 3),
                "journal_write_us_per_event_p50": round(statistics.median(appends) * 1e6 / size, 1),
            }
            result.append(row)
        journal.close()
    print(
        f"{'events/flush':>12} {'flush p50 ms':>13} {'journaled p50 ms':>17} "
        f"{'journal write p50 / p95 ms':>27} {'us/event':>9}"
    )
    for r in result:
        print(
            f"{r['events_per_flush']:>12} {r['flush_ms_plain_p50']:>13} "
            f"{r['flush_ms_journaled_p50']:>17} "
            f"{str(r['journal_write_ms_p50']) + ' / ' + str(r['journal_write_ms_p95']):>27} "
            f"{r['journal_write_us_per_event_p50']:>9}"
        )
    print(json.dumps({"journal": result}))


if __name__ == "__main__":
    main()
