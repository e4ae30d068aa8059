"""Stages as threads of one `kbstream up` versus worker processes
(`kbstream up --workers ...`), on the same corpus and machine.

One command, from the repository root:

    .venv/bin/python benchmarks/processes.py [--docs 40] [--corpus DIR]
        [--workers parse=2,split=2,index_keywords=2] [--device cpu] [--repeat 1]

For each mode, on a fresh temporary home (tansu broker, SQLite, milvus-lite
server, the bundled model on --device): start `kbstream up` (threads: no
--workers), wait until every consumer has its partitions, index one small
warm-up document (every model and dictionary loaded), then time
`kbstream index CORPUS` (uploads the files, waits until every document is
completed) and stop `up` with SIGTERM. The first N HTML pages of
python3.11-doc's library/ are the corpus, as in benchmarks/run.py.

Printed: both timings, documents/s, segments/s and the ratio (processes ÷
threads, > 1: processes are faster), the "database is locked" errors and
tracebacks found in the logs (SQLite writers must wait, not fail); the last
line is the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOC_ROOT = Path("/usr/share/doc/python3.11/html")
DEFAULT_WORKERS = "parse=2,split=2,index_keywords=2,embed=1,load_vectors=1"
WARM_UP = "Warm-up page. The harbour master keeps a ledger of every ship in port.\n"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_corpus(corpus: Path | None, n: int, dest: Path) -> list[Path]:
    if corpus is None:
        from benchmarks.common import ensure_doc_package  # installs python3.11-doc if missing

        ensure_doc_package()
    source = (corpus or DOC_ROOT).expanduser().resolve()
    if (source / "library").is_dir():
        source = source / "library"
    chosen = sorted(p for p in source.rglob("*.html") if p.is_file())[:n]
    if not chosen:
        raise SystemExit(f"no HTML files under {source} (install python3.11-doc or use --corpus)")
    dest.mkdir(parents=True)
    for p in chosen:
        shutil.copyfile(p, dest / p.relative_to(source).as_posix().replace("/", "__"))
    return chosen


def kbstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "kbstream.cli", *args]


def base_env(device: str) -> dict[str, str]:
    # no configured stack leaks in; the model settings (which model, batch sizes) may
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KBSTREAM_") or k.startswith(("KBSTREAM_EMBEDDING_", "KBSTREAM_EMBED_"))
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        KBSTREAM_EMBEDDING_DEVICE=device,
    )
    return env


def members(workers: str | None) -> dict[str, int]:
    """Consumers per stage that must have joined before timing starts."""
    from consumers.pipeline import STAGES
    from kbstream.settings import Settings
    from kbstream.supervisor import parse_workers

    counts = {s: 1 for s in STAGES}
    if workers:
        counts.update(parse_workers(workers, STAGES, partitions=Settings().partitions))
    return counts


def wait_joined(
    log: Path, want: dict[str, int], proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kbstream up exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        text = log.read_text(errors="replace")
        joined = {s: len(re.findall(rf"stage {s} assigned \[\(", text)) for s in want}
        if all(joined[s] >= n for s, n in want.items()):
            return
        time.sleep(0.5)
    raise SystemExit(f"consumers did not join within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def run_mode(
    name: str,
    workers: str | None,
    corpus: Path,
    warm: Path,
    device: str,
    root: Path,
    up_args: Sequence[str] = (),
    replay: bool = False,
    env_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One `kbstream up` (with ``up_args``): time `index CORPUS`, and with
    ``replay`` also `index --force CORPUS` (every document through every
    stage again, nothing embedded: the pipeline without the model)."""
    home = root / name / "home"
    home.mkdir(parents=True)
    env = {**base_env(device), **(env_extra or {})}
    log = root / name / "up.log"
    argv = kbstream(
        "up", "--home", str(home), *(["--workers", workers] if workers else []), *up_args
    )
    say(f"{name}: {' '.join(argv[2:])}")
    t0 = time.monotonic()
    with log.open("wb") as out:
        up = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_joined(log, members(workers), up, timeout=300)
        started = time.monotonic() - t0
        index = kbstream("index", "--home", str(home), "--json")
        subprocess.run(
            [*index, str(warm), "--dataset", "warmup"],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )

        def timed_index(*extra: str) -> tuple[float, dict[str, Any]]:
            t = time.monotonic()
            done = subprocess.run(
                [*index, *extra, str(corpus), "--dataset", "bench"],
                cwd=REPO,
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            return time.monotonic() - t, json.loads(done.stdout)

        seconds, summary = timed_index()
        replayed: dict[str, Any] = {}
        if replay:
            # the CLI's own cost: start, hash the files, find nothing to publish
            noop_s, _ = timed_index()
            replay_s, r = timed_index("--force")
            replayed = {
                "noop_index_s": round(noop_s, 2),
                "replay_s": round(replay_s, 2),
                "replay_pipeline_s": round(replay_s - noop_s, 2),
                "replay_completed": r["completed"],
                "replay_embedded": r["embedded"],
                "replay_segments_per_s": round(r["segments"] / replay_s, 2),
            }
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            rc = up.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            rc = up.wait(10)
    logs = log.read_text(errors="replace") + (home / "kbstream.log").read_text(errors="replace")
    result = {
        "mode": name,
        "workers": workers,
        "startup_s": round(started, 2),
        "index_s": round(seconds, 2),
        "documents": summary["documents"],
        "completed": summary["completed"],
        "segments": summary["segments"],
        "docs_per_s": round(summary["documents"] / seconds, 2),
        "segments_per_s": round(summary["segments"] / seconds, 2),
        "database_locked": logs.count("database is locked"),
        "tracebacks": logs.count("Traceback"),
        "up_exit": rc,
        **replayed,
    }
    say(f"{name}: {json.dumps(result)}")
    return result


@contextmanager
def workspace(prefix: str, corpus: Path | None, docs: int, keep: bool) -> Iterator[Path]:
    """A temporary root holding corpus/ (the chosen pages) and warm/ (the
    warm-up document); removed afterwards unless kept."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        pick_corpus(corpus, docs, root / "corpus")
        (root / "warm").mkdir()
        (root / "warm" / "warm-up.txt").write_text(WARM_UP)
        yield root
    finally:
        if keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(r[key] for r in runs)), 2)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=40, help="first N pages of the corpus")
    ap.add_argument("--corpus", type=Path, help="HTML folder instead of python3.11-doc")
    ap.add_argument("--workers", default=DEFAULT_WORKERS, help="`up --workers` for processes")
    ap.add_argument("--device", default="cpu", help="KBSTREAM_EMBEDDING_DEVICE (cpu, cuda)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode; medians reported")
    ap.add_argument("--keep", action="store_true", help="keep the temporary homes")
    args = ap.parse_args(argv)

    runs: dict[str, list[dict[str, Any]]] = {"threads": [], "processes": []}
    with workspace("kbstream-procs-", args.corpus, args.docs, args.keep) as root:
        for k in range(args.repeat):
            for mode, workers in (("threads", None), ("processes", args.workers)):
                runs[mode].append(
                    run_mode(
                        f"{mode}-{k}", workers, root / "corpus", root / "warm", args.device, root
                    )
                )

    def med(mode: str, key: str) -> float:
        return median_of(runs[mode], key)

    t, p = med("threads", "index_s"), med("processes", "index_s")
    out = {
        "benchmark": "processes",
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "device": args.device,
        "documents": runs["threads"][0]["documents"],
        "segments": runs["threads"][0]["segments"],
        "workers": args.workers,
        "repeat": args.repeat,
        "threads_index_s": t,
        "processes_index_s": p,
        "threads_segments_per_s": med("threads", "segments_per_s"),
        "processes_segments_per_s": med("processes", "segments_per_s"),
        "speedup": round(t / p, 2),
        "database_locked": sum(r["database_locked"] for rs in runs.values() for r in rs),
        "tracebacks": sum(r["tracebacks"] for rs in runs.values() for r in rs),
        "all_completed": all(r["completed"] == r["documents"] for rs in runs.values() for r in rs),
    }
    print(f"{'':<22}{'threads':>12}{'processes':>12}")
    print(f"{'index seconds':<22}{t:>12}{p:>12}")
    print(
        f"{'segments/s':<22}{out['threads_segments_per_s']:>12}"
        f"{out['processes_segments_per_s']:>12}"
    )
    print(f"{'speed-up (t/p)':<22}{out['speedup']:>24}")
    print(f"{'database is locked':<22}{out['database_locked']:>24}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
