"""How a stage scales with its processes: `kbstream up --workers STAGE=N` for
N = 1, 2, 4 (the other stages one process each) on PostgreSQL and a
milvus-lite server, the way pods share a production stack.

One command, from the repository root:

    .venv/bin/python benchmarks/scaling.py [--stage parse,split] [--counts 1,2,4]
        [--docs 40] [--repeat 1] [--device cpu] [--pg URL]

For each N, alternating within each round, on a fresh PostgreSQL database, a
fresh milvus-lite server and a fresh home (its own tansu broker): start `up`,
wait until every member has joined, index a warm-up document, then time
`kbstream index CORPUS` (cold: the model embeds every text) and
`kbstream index CORPUS` again (nothing changed: the CLI's own cost, start-up
and hashing) and `kbstream index --force CORPUS` (every document through parse
and split again, nothing embedded: the pipeline's own work, where parse and
split are the busiest stages). Every stage named in --stage gets N processes.

Printed: segments/s of both phases for every N and the ratio to N = 1; the
last line is the same as JSON. Exits 1 if a document did not complete or the
replay embedded anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import fresh_database  # noqa: E402
from benchmarks.processes import median_of, run_mode, workspace  # noqa: E402

PG_URL = os.environ.get(
    "KBSTREAM_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def one_run(
    n: int, stages: list[str], corpus: Path, warm: Path, device: str, root: Path, pg: str, k: int
) -> dict[str, Any]:
    from kbstream.processes import MilvusLiteServer

    name = f"n{n}-{k}"
    workers = ",".join(f"{s}={n}" for s in stages)
    milvus = MilvusLiteServer(root / name / "milvus" / "milvus.db").start()
    try:
        with fresh_database(pg) as url:
            env = {"KBSTREAM_DATABASE_URL": url, "KBSTREAM_MILVUS_URI": milvus.uri}
            r = run_mode(name, workers, corpus, warm, device, root, replay=True, env_extra=env)
    finally:
        milvus.stop()
    return {**r, "processes": n}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="parse,split", help="stages given N processes each")
    ap.add_argument("--counts", default="1,2,4", help="process counts to compare")
    ap.add_argument("--docs", type=int, default=40, help="first N pages of the corpus")
    ap.add_argument("--corpus", type=Path, help="HTML folder instead of python3.11-doc")
    ap.add_argument("--device", default="cpu", help="KBSTREAM_EMBEDDING_DEVICE (cpu, cuda)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; medians reported")
    ap.add_argument("--pg", default=PG_URL, help="PostgreSQL admin URL (databases are created)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary homes")
    args = ap.parse_args(argv)
    stages = [s for s in args.stage.split(",") if s]
    counts = [int(c) for c in args.counts.split(",")]

    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    with workspace("kbstream-scaling-", args.corpus, args.docs, args.keep) as root:
        for k in range(args.repeat):
            order = counts if k % 2 == 0 else counts[::-1]
            for n in order:
                runs[n].append(
                    one_run(
                        n, stages, root / "corpus", root / "warm", args.device, root, args.pg, k
                    )
                )

    def med(n: int, key: str) -> float:
        return median_of(runs[n], key)

    base = counts[0]
    rows = {
        n: {
            "cold_segments_per_s": med(n, "segments_per_s"),
            "replay_segments_per_s": med(n, "replay_segments_per_s"),
            "cold_vs_first": round(med(n, "segments_per_s") / med(base, "segments_per_s"), 2),
            "replay_vs_first": round(
                med(n, "replay_segments_per_s") / med(base, "replay_segments_per_s"), 2
            ),
            "noop_index_s": med(n, "noop_index_s"),
            "replay_pipeline_s": med(n, "replay_pipeline_s"),
        }
        for n in counts
    }
    every = [r for rs in runs.values() for r in rs]
    ok = all(r["completed"] == r["documents"] for r in every) and all(
        r["replay_completed"] == r["documents"] and r["replay_embedded"] == 0 for r in every
    )
    out = {
        "benchmark": "scaling",
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "device": args.device,
        "stages": stages,
        "documents": every[0]["documents"],
        "segments": every[0]["segments"],
        "repeat": args.repeat,
        "by_processes": rows,
        "database_locked": sum(r["database_locked"] for r in every),
        "tracebacks": sum(r["tracebacks"] for r in every),
        "all_completed": ok,
        "runs": every,
    }
    print(
        f"{'processes of ' + '+'.join(stages):<28}{'cold seg/s':>12}{'÷ N=' + str(base):>8}", end=""
    )
    print(
        f"{'replay seg/s':>14}{'÷ N=' + str(base):>8}{'no-op index s':>15}{'replay - no-op s':>18}"
    )
    for n, row in rows.items():
        print(
            f"{n:<28}{row['cold_segments_per_s']:>12}{row['cold_vs_first']:>8}"
            f"{row['replay_segments_per_s']:>14}{row['replay_vs_first']:>8}"
            f"{row['noop_index_s']:>15}{row['replay_pipeline_s']:>18}"
        )
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
