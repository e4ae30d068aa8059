"""Freshness: how long after its event is published a one-page document is
searchable, with warm workers (`kbstream up`).

One command, from the repository root:

    .venv/bin/python benchmarks/freshness.py [--publishes 50] [--gap 0.5] [--device cpu]
        [--workers parse=2,...] [--runtime confluent|faust]

On a fresh temporary home (tansu broker, SQLite, milvus-lite server, the
bundled model on --device): start `kbstream up`, wait until every consumer has
its partitions, index one warm-up document (every model and dictionary
loaded), then publish N one-page documents one at a time, as an upstream
system would (an inline `document.created` event on the lifecycle topic), each
with a word found in no other document. For each, the clock runs from the
moment the broker acknowledged the event until a keyword search for its word
returns it AND a vector search returns it (both branches of the index), polled
every 10 ms from this process through the stack's own database and Milvus
server (the query vector is embedded before the publish, so the probe costs
the pipeline little CPU). `--gap` seconds pass between one document becoming searchable and the
next publish, so the figures are latencies on an idle pipeline, not under load.

Printed: p50, p95 and max seconds, and the share of publishes searchable
within 1 s and 3 s; the last line is the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.processes import base_env, kbstream, members, say, wait_joined  # noqa: E402

PAGE = (
    "Freshness probe {word}. The lighthouse keeper on the northern cape writes down the "
    "colour of the sea every morning, the direction of the wind and the ships that pass. "
    "Keepers before her kept the same ledger for a hundred and twelve years, and the "
    "ledgers now fill a shelf in the town library, where students of the weather read them.\n"
)
WARM_UP = "Warm-up page. The harbour master keeps a ledger of every ship in port.\n"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def stop(up: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(90)
    except ProcessLookupError:  # it had already exited
        pass
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)


class Probe:
    """Polls one document until both indexes return it. The query vector is
    embedded once, before the publish, and a side found is not asked again:
    the probe shares the machine's cores with the pipeline it measures, and
    embedding the query on every 10 ms poll kept most of a core busy."""

    def __init__(self, container: Any, dataset: str, word: str, document_id: str) -> None:
        from kbstream.serving import search_index

        self.c, self.dataset, self.word, self.document_id = container, dataset, word, document_id
        self.store, provider = search_index(container, dataset)
        self.vector = provider.embed([PAGE.format(word=word)])[0]
        self.keyword = self.vector_found = False

    def _found(self, ids: list[str]) -> bool:
        if not ids:
            return False
        with self.c.uow(readonly=True) as uow:
            rows = uow.segments.by_ids(ids)
        return any(r.document_id == self.document_id for r in rows.values())

    def searchable(self) -> bool:
        tenant = self.c.settings.tenant
        if not self.keyword:
            hits = self.c.keyword_index.search(self.word, tenant, self.dataset, 5)
            self.keyword = self._found([n for n, _ in hits])
        if not self.vector_found:
            vhits = self.store.search(self.vector, tenant, self.dataset, 3)
            self.vector_found = self._found([h.index_node_id for h in vhits])
        return self.keyword and self.vector_found


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--publishes", type=int, default=50)
    ap.add_argument("--gap", type=float, default=0.5, help="idle seconds between publishes")
    ap.add_argument("--device", default=os.environ.get("KBSTREAM_EMBEDDING_DEVICE", "cpu"))
    ap.add_argument("--workers", default=None, help="as for `kbstream up --workers`")
    ap.add_argument("--runtime", default="confluent", help="as for `kbstream up --runtime`")
    ap.add_argument(
        "--fetch-wait-ms", type=int, help="KBSTREAM_FETCH_WAIT_MS for `up` (default: the setting's)"
    )
    ap.add_argument("--timeout", type=float, default=60.0, help="give up on one document after")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="kbstream-fresh-"))
    home = root / "home"
    home.mkdir()
    env = base_env(args.device)
    if args.fetch_wait_ms is not None:
        env["KBSTREAM_FETCH_WAIT_MS"] = str(args.fetch_wait_ms)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("HF_", "TRANSFORMERS_"))})
    log = root / "up.log"
    argv_up = kbstream(
        "up",
        "--home",
        str(home),
        "--runtime",
        args.runtime,
        *(["--workers", args.workers] if args.workers else []),
    )
    with log.open("wb") as out:
        up = subprocess.Popen(
            argv_up, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    latencies: list[float] = []
    misses = 0
    try:
        wait_joined(log, members(args.workers), up, timeout=300)
        warm = root / "warm.txt"
        warm.write_text(WARM_UP)
        subprocess.run(
            [*kbstream("index", "--home", str(home)), str(warm), "--dataset", "fresh"],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        from infra.kafka.topics import Topics
        from kbstream.bootstrap import Container
        from kbstream.journal import writer_for
        from kbstream.processes import apply_running_stack
        from kbstream.settings import Settings
        from producers.client import LifecyclePublisher

        settings = apply_running_stack(Settings(home=home))
        container = Container(settings)
        container.provider.warm_up()  # the query side's model, not the pipeline's
        # journaled, as `kbstream publish` is: the journal write is part of a publish
        publisher = LifecyclePublisher(
            settings.brokers or "",
            Topics(settings.topic_prefix),
            journal=writer_for(settings, settings.brokers or ""),
        )
        for i in range(args.publishes):
            word = f"fresh{uuid.uuid4().hex[:10]}"
            document_id = f"fresh-{i}"
            probe = Probe(container, "fresh", word, document_id)
            publisher.publish(
                {
                    "type": "document.created",
                    "tenant_id": settings.tenant,
                    "dataset_id": "fresh",
                    "document_id": document_id,
                    "source": f"{document_id}.txt",
                    "content": PAGE.format(word=word),
                }
            )
            publisher.flush()
            t0 = time.monotonic()
            while True:
                if probe.searchable():
                    latencies.append(time.monotonic() - t0)
                    break
                if time.monotonic() - t0 > args.timeout:
                    misses += 1
                    say(f"{document_id}: not searchable after {args.timeout:.0f}s")
                    break
                time.sleep(0.01)
            say(f"{document_id}: {latencies[-1] if latencies else float('nan'):.3f}s")
            time.sleep(args.gap)
        publisher.close()
        container.close()
    finally:
        stop(up)
    if not latencies:
        raise SystemExit("no document became searchable")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, embedding on {args.device}",
        "workers": args.workers or "threads",
        "runtime": args.runtime,
        "fetch_wait_ms": args.fetch_wait_ms,
        "publishes": args.publishes,
        "searchable": len(latencies),
        "not_searchable": misses,
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(percentile(latencies, 0.95), 3),
        "max_s": round(max(latencies), 3),
        "within_1s": round(sum(t <= 1.0 for t in latencies) / len(latencies), 3),
        "within_3s": round(sum(t <= 3.0 for t in latencies) / len(latencies), 3),
    }
    print(
        f"freshness over {len(latencies)} publishes ({result['machine']}, {result['workers']}): "
        f"p50 {result['p50_s']:.3f}s  p95 {result['p95_s']:.3f}s  max {result['max_s']:.3f}s  "
        f"within 1s {result['within_1s']:.0%}  within 3s {result['within_3s']:.0%}"
    )
    print(json.dumps(result))
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())
