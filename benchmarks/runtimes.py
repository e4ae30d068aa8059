"""The two stage runtimes side by side: the confluent-kafka loop (default) and
faust-streaming agents, on the same corpus and machine.

One command, from the repository root:

    .venv/bin/python benchmarks/runtimes.py [--docs 40] [--corpus DIR] [--device cpu]
        [--repeat 1] [--workers STAGE=N,...]

For each runtime, on a fresh temporary home (tansu broker, SQLite, milvus-lite
server, the bundled model on --device): start `kbstream up --runtime R`, wait
until every consumer has its partitions, index one warm-up document, then time

- `kbstream index CORPUS`: every document created, parsed, split, embedded
  and indexed (the model is most of it on a CPU), and
- `kbstream index --force CORPUS`: every document through every stage again,
  nothing embedded (embedding-cache hits): what the runtime itself costs.

Runs alternate (confluent, faust, confluent, ...) so both see the same
machine. Printed: seconds and segments/s of each phase and the ratio faust ÷
confluent (> 1: faust is faster); the last line is the same as JSON.
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

from benchmarks.processes import median_of, run_mode, workspace  # noqa: E402

RUNTIMES = ("confluent", "faust")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=40, help="first N pages of the corpus")
    ap.add_argument("--corpus", type=Path, help="HTML folder instead of python3.11-doc")
    ap.add_argument("--device", default="cpu", help="KBSTREAM_EMBEDDING_DEVICE (cpu, cuda)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per runtime; medians reported")
    ap.add_argument("--workers", help="`up --workers` for both runtimes (default: threads)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary homes")
    args = ap.parse_args(argv)

    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in RUNTIMES}
    with workspace("kbstream-runtimes-", args.corpus, args.docs, args.keep) as root:
        for k in range(args.repeat):
            for runtime in RUNTIMES:
                runs[runtime].append(
                    run_mode(
                        f"{runtime}-{k}",
                        args.workers,
                        root / "corpus",
                        root / "warm",
                        args.device,
                        root,
                        up_args=("--runtime", runtime),
                        replay=True,
                    )
                )

    def med(runtime: str, key: str) -> float:
        return median_of(runs[runtime], key)

    keys = ("startup_s", "index_s", "segments_per_s", "replay_s", "replay_segments_per_s")
    table = {r: {k: med(r, k) for k in keys} for r in RUNTIMES}
    c, f = table["confluent"], table["faust"]
    out = {
        "benchmark": "runtimes",
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "device": args.device,
        "documents": runs["confluent"][0]["documents"],
        "segments": runs["confluent"][0]["segments"],
        "workers": args.workers,
        "repeat": args.repeat,
        **{f"{r}_{k}": v for r, vals in table.items() for k, v in vals.items()},
        "index_ratio": round(f["segments_per_s"] / c["segments_per_s"], 2),
        "replay_ratio": round(f["replay_segments_per_s"] / c["replay_segments_per_s"], 2),
        "replay_embedded": sum(r["replay_embedded"] for rs in runs.values() for r in rs),
        "tracebacks": sum(r["tracebacks"] for rs in runs.values() for r in rs),
        "all_completed": all(
            r["completed"] == r["documents"] and r["replay_completed"] == r["documents"]
            for rs in runs.values()
            for r in rs
        ),
    }
    print(f"{'':<26}{'confluent':>12}{'faust':>12}{'faust/conf':>12}")
    print(f"{'start-up s (up joined)':<26}{c['startup_s']:>12}{f['startup_s']:>12}")
    print(f"{'index s':<26}{c['index_s']:>12}{f['index_s']:>12}")
    print(
        f"{'index segments/s':<26}{c['segments_per_s']:>12}{f['segments_per_s']:>12}"
        f"{out['index_ratio']:>12}"
    )
    print(f"{'replay s':<26}{c['replay_s']:>12}{f['replay_s']:>12}")
    print(
        f"{'replay segments/s':<26}{c['replay_segments_per_s']:>12}"
        f"{f['replay_segments_per_s']:>12}{out['replay_ratio']:>12}"
    )
    print(json.dumps(out))
    return 0 if out["all_completed"] and out["replay_embedded"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
