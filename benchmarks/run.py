"""kbstream end-to-end benchmark: how close does the streaming pipeline get to
the bare embedding model on the same machine?

One command, from the repository root:

    .venv/bin/python benchmarks/run.py [--docs N] [--corpus DIR] [--out FILE] [--repeat K]
                                       [--keep] [--stages]

Phases, all in this one process, on a fresh temporary home (embedded mode:
tansu broker + SQLite + milvus-lite + the bundled all-MiniLM-L6-v2, every stage
a thread):

1. corpus   the first N HTML pages (sorted) of library/ in Debian's
            python3.11-doc, copied into a temporary folder
2. cold     kbstream.indexing.index_paths on an empty home, wall clock
            including broker start, consumer group joins and model load
3. bare     the exact segment texts that run stored, embedded by a freshly
            loaded SentenceTransformerProvider (warmed up) in batches of the
            pipeline's embed batch; median of --repeat runs
4. ratio    end-to-end segments/s ÷ bare-model segments/s (and the same with
            the fixed start-up costs taken out, labelled as such)
5. re-index the unchanged corpus again: nothing published, nothing embedded,
            counts unchanged
6. replay   index_paths(force=True): every document through every stage again;
            nothing embedded (embedding-cache hits), counts unchanged
7. stages   with --stages only: every stage alone on the same corpus and a fresh
            home, in segments/s (benchmarks/stages.py)

See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# first: it clears KBSTREAM_* from the environment before anything builds Settings
from benchmarks.common import (  # noqa: E402
    DATASET,
    DEFAULT_DOCS,
    DOC_ROOT,
    DROPPED_ENV,
    MODEL_SETTINGS,
    pick_corpus,
    release_milvus_lite,
    say,
)

log = logging.getLogger("benchmark")


# -- instrumentation (observes the pipeline; changes nothing) ----------------


class LogWatch(logging.Handler):
    """Reads timings and split decisions off the pipeline's own log records:
    when each stage's consumer got its partitions (group joined), and how
    many segments the split stage sent on versus kept."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reset()

    def reset(self) -> None:
        self.assigned: dict[str, float] = {}
        self.split_to_index = 0
        self.split_kept = 0
        self.split_removed = 0

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.name == "infra.kafka.runner" and record.msg == "stage %s assigned %s":
            self.assigned.setdefault(str(args[0]), record.created)
        elif record.name == "consumers.split" and str(record.msg).startswith("split: %s v%s ->"):
            # (source, version, segments, to index, kept, removed)
            self.split_to_index += int(args[3])
            self.split_kept += int(args[4])
            self.split_removed += int(args[5])


class EmbedProbe:
    """Wraps the container's provider.embed (an instance attribute, so the
    class is untouched) to time the model load (first access of the lazy
    model, import included, whichever thread does it) and every embed call
    made by the embed stage's thread. Calls from other threads (a warm-up)
    are counted apart."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.original = provider.embed
        self.load_s = 0.0
        self.load_end: float | None = None
        self.load_thread: str | None = None
        self.busy_s = 0.0
        self.calls: list[int] = []
        self.detail: list[tuple[float, int, float]] = []  # (started, texts, seconds)
        self.other_calls = 0
        provider.embed = self

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        thread = threading.current_thread().name
        if "_st" not in self.provider.__dict__:
            t = time.perf_counter()
            _ = self.provider._st  # the lazy model load
            if self.load_end is None:
                self.load_s = time.perf_counter() - t
                self.load_end = time.time()
                self.load_thread = thread
        started = time.time()
        t = time.perf_counter()
        out = self.original(texts)
        took = time.perf_counter() - t
        if thread.startswith("stage-"):
            self.busy_s += took
            self.calls.append(len(texts))
            self.detail.append((started, len(texts), took))
        else:
            self.other_calls += 1
        return out  # type: ignore[no-any-return]


class FirstCall:
    """Times the first call of a bound method (instance attribute wrap)."""

    def __init__(self, obj: Any, name: str) -> None:
        self.original = getattr(obj, name)
        self.first_s: float | None = None
        setattr(obj, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.first_s is not None:
            return self.original(*args, **kwargs)
        t = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.first_s = time.perf_counter() - t


class CpuMeter:
    """CPU used by other processes during a phase, from /proc: all busy CPU
    time minus this process's (every thread), its reaped children's (the
    broker, milvus-lite) and its live descendants'. A shared machine's
    neighbours show up here, and they move the bare/pipeline numbers."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.own_cpu_s = 0.0
        self.start = self.sample()

    def sample(self) -> tuple[float, float, float]:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
        busy = (sum(f[:8]) - f[3] - f[4]) / self.tick  # minus idle and iowait
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system + self._descendants()
        return time.monotonic(), busy, own

    def _descendants(self) -> float:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as fh:
                    rest = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(d)] = int(rest[1])
            cpu[int(d)] = (int(rest[11]) + int(rest[12])) / self.tick
        me = os.getpid()
        total = 0.0
        for pid in cpu:
            p = parents.get(pid)
            while p and p != me:
                p = parents.get(p)
            if p == me:
                total += cpu[pid]
        return total

    def other_cores(self) -> float:
        """Average cores busy with other processes since the last call."""
        now = self.sample()
        wall = now[0] - self.start[0]
        other = (now[1] - self.start[1]) - (now[2] - self.start[2])
        # this process tree's own CPU seconds over the same span (every thread,
        # the broker and milvus-lite children): what the work itself cost
        self.own_cpu_s = round(now[2] - self.start[2], 2)
        self.start = now
        return round(max(0.0, other) / wall, 2) if wall > 0 else 0.0


# -- pipeline runs -----------------------------------------------------------


def make_settings(home: Path) -> Any:
    from kbstream.settings import Settings

    # explicit: no env brokers / database / Milvus server, embedded everything
    return Settings(home=home, brokers=None, database_url=None, milvus_uri=None, **MODEL_SETTINGS)


def setup_logging(home: Path) -> tuple[LogWatch, logging.Handler]:
    home.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fh = logging.FileHandler(home / "kbstream.log")
    fh.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    )
    root.addHandler(fh)
    for noisy in ("pymilvus", "urllib3", "httpx", "sentence_transformers", "transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    logging.getLogger("rdkafka").propagate = False
    logging.getLogger("rdkafka").addHandler(fh)
    joins = LogWatch()
    root.addHandler(joins)
    return joins, fh


@contextlib.contextmanager
def container_for(home: Path) -> Iterator[Any]:
    from kbstream.bootstrap import Container

    c = Container(make_settings(home))
    try:
        yield c
    finally:
        c.close()
        release_milvus_lite(c.settings.vector_uri)


def counts(container: Any) -> dict[str, int]:
    tenant = container.settings.tenant
    with container.uow(readonly=True) as uow:
        segments = uow.segments.count(tenant, DATASET)
    return {
        "segments": segments,
        "vectors": container.vectors.count(tenant, DATASET),
        "keyword_entities": container.keyword_index.count(tenant, DATASET),
    }


def run_index(
    container: Any, corpus: Path, force: bool, joins: LogWatch | None = None
) -> dict[str, Any]:
    from kbstream.indexing import index_paths

    marks: dict[str, float] = {}

    def progress(done: int, total: int, _segments: int) -> None:
        now = time.time()
        marks.setdefault("first_wait", now)  # first call: every event published and flushed
        if done >= total:
            marks.setdefault("all_done", now)

    if joins is not None:
        joins.reset()
    started = time.time()
    t0 = time.perf_counter()
    summary = index_paths(container, [corpus], DATASET, force=force, progress=progress)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "started_epoch": started,
        "summary": summary.to_dict(),
    }
    if "first_wait" in marks:
        out["published_s"] = round(marks["first_wait"] - started, 3)
        if "all_done" in marks:
            out["published_to_done_s"] = round(marks["all_done"] - marks["first_wait"], 3)
            # pool.stop() + broker stop + the final summary
            out["teardown_s"] = round(started + seconds - marks["all_done"], 3)
    if joins is not None:
        if joins.assigned:
            out["groups_joined_s"] = round(max(joins.assigned.values()) - started, 3)
            out["stages_joined"] = sorted(joins.assigned)
        out["split_sent_on"] = joins.split_to_index
        out["split_kept"] = joins.split_kept
        out["split_removed"] = joins.split_removed
    return out


def read_segment_texts(container: Any) -> tuple[list[str], int, float]:
    """Distinct (by doc_hash) segment texts of the dataset, in document and
    position order: exactly the texts the embed stage sent to the model (it
    embeds each doc_hash once). Returns (texts, segment rows, mean tokens)."""
    from sqlalchemy import select

    from infra.db.models import SegmentRow

    s = SegmentRow.__table__
    with container.database.connect() as conn:
        rows = conn.execute(
            select(s.c.doc_hash, s.c.content, s.c.tokens)
            .where(s.c.tenant_id == container.settings.tenant, s.c.dataset_id == DATASET)
            .order_by(s.c.document_id, s.c.position)
        ).all()
    seen: set[str] = set()
    texts = []
    for h, content, _tokens in rows:
        if h not in seen:
            seen.add(h)
            texts.append(content)
    mean_tokens = statistics.mean(r[2] for r in rows) if rows else 0.0
    return texts, len(rows), round(mean_tokens, 1)


def bare_model(settings: Any, texts: list[str], batch: int, repeat: int) -> dict[str, Any]:
    from infra.embedding import SentenceTransformerProvider

    provider = SentenceTransformerProvider(
        settings.embedding_model,
        device=settings.embedding_device,
        batch_size=settings.embedding_batch_size,
    )
    t = time.perf_counter()
    _ = provider._st
    load_s = time.perf_counter() - t
    provider.warm_up()
    runs, cpu = [], []
    for _i in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(texts), batch):
            provider.embed(texts[i : i + batch])
        runs.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    med = statistics.median(runs)
    return {
        "texts": len(texts),
        "batch": batch,
        "encode_batch_size": settings.embedding_batch_size,
        "load_s_second_load_in_process": round(load_s, 3),
        "runs_s": [round(r, 3) for r in runs],
        "median_s": round(med, 3),
        "cpu_s": round(statistics.median(cpu), 2),
        "segments_per_s": round(len(texts) / med, 2) if med else None,
        "best_segments_per_s": round(len(texts) / min(runs), 2) if min(runs) else None,
    }


# -- report ------------------------------------------------------------------


def fmt_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--docs", type=int, default=DEFAULT_DOCS, help=f"HTML pages (default {DEFAULT_DOCS})"
    )
    ap.add_argument("--corpus", type=Path, help="HTML folder instead of python3.11-doc")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "latest.json",
        help="JSON result file (default benchmarks/results/latest.json)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="bare-model timings; median reported")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temporary home and corpus (path printed)"
    )
    ap.add_argument(
        "--stages",
        action="store_true",
        help="then run each stage alone on the same corpus (benchmarks/stages.py's table)",
    )
    ap.add_argument("--device", help="embedding device, e.g. cuda (fp16); default cpu")
    ap.add_argument("--model", help="a sentence-transformers folder instead of the bundled one")
    ap.add_argument("--batch-size", type=int, help="model encode batch size (default 32)")
    ap.add_argument(
        "--embed-max-segments", type=int, help="segments one embed poll takes (default 96)"
    )
    ap.add_argument(
        "--no-lookahead",
        action="store_true",
        help="embed without prefetching the next batch (KBSTREAM_EMBED_LOOKAHEAD=false)",
    )
    args = ap.parse_args(argv)
    if args.no_lookahead:
        MODEL_SETTINGS["embed_lookahead"] = False
    for name, value in (
        ("embedding_device", args.device),
        ("embedding_model", args.model),
        ("embedding_batch_size", args.batch_size),
        ("embed_max_segments", args.embed_max_segments),
    ):
        if value is not None:
            MODEL_SETTINGS[name] = value
    if args.docs < 1 or args.repeat < 1:
        ap.error("--docs and --repeat must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="kbstream-bench-"))
    corpus_dir = work / "corpus"
    home = work / "home"
    files = pick_corpus(args.corpus, args.docs, corpus_dir)
    corpus_bytes = sum(p.stat().st_size for p in files)
    say(f"corpus: {len(files)} HTML files, {corpus_bytes / 1024:.0f} KiB -> {corpus_dir}")
    say(f"home:   {home}")
    if DROPPED_ENV:
        say(f"env:    ignoring {', '.join(DROPPED_ENV)}")

    joins, fh = setup_logging(home)
    import torch

    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings_overrides": dict(MODEL_SETTINGS),
        "machine": {
            "cpu_cores": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_at_start": round(os.getloadavg()[0], 2),
        },
        "corpus": {
            "source": str(args.corpus or DOC_ROOT / "library"),
            "files": len(files),
            "bytes": corpus_bytes,
            "first": files[0].name,
            "last": files[-1].name,
        },
        "checks": {},
    }

    meter = CpuMeter()
    # 2. cold end-to-end
    say("cold:   indexing on an empty home (broker start, group joins, model load included)")
    with container_for(home) as c:
        probe = EmbedProbe(c.provider)
        milvus_open = FirstCall(c.vectors, "upsert")
        cold = run_index(c, corpus_dir, force=False, joins=joins)
        s = cold["summary"]
        if milvus_open.first_s is not None:
            cold["first_milvus_upsert_s"] = round(milvus_open.first_s, 3)
        cold["model_load_s"] = round(probe.load_s, 3)
        cold["model_loaded_by"] = probe.load_thread
        if probe.load_end is not None:
            cold["model_ready_s"] = round(probe.load_end - cold["started_epoch"], 3)
        cold["embed_calls_other_threads"] = probe.other_calls
        cold["embed_busy_s"] = round(probe.busy_s, 3)
        cold["embed_calls"] = len(probe.calls)
        cold["embed_texts_per_call_mean"] = (
            round(statistics.mean(probe.calls), 1) if probe.calls else 0
        )
        cold["embed_texts_per_call_max"] = max(probe.calls, default=0)
        # second half of the embed calls: parse/split are long done by then
        late = probe.detail[len(probe.detail) // 2 :]
        late_s = sum(d[2] for d in late)
        cold["embed_late_half_segments_per_s"] = (
            round(sum(d[1] for d in late) / late_s, 2) if late_s else None
        )
        cold["embed_calls_detail"] = [
            [round(a - probe.detail[0][0], 2), n, round(d, 3)] for a, n, d in probe.detail
        ]
        texts, segment_rows, mean_tokens = read_segment_texts(c)
        cold_counts = counts(c)
        settings = c.settings
    cold["other_processes_cores"] = meter.other_cores()
    cold["own_cpu_s"] = meter.own_cpu_s
    embedded = s["embedded"]
    cold["segments_per_s"] = round(embedded / cold["seconds"], 2) if cold["seconds"] else None
    result["cold"] = cold
    result["counts_after_cold"] = cold_counts
    result["checks"]["cold_all_completed"] = s["completed"] == s["documents"] and not s["failed"]
    result["checks"]["cold_embedded_equals_distinct_texts"] = embedded == len(texts)
    say(
        f"cold:   {cold['seconds']:.1f}s, {s['segments']} segments, {embedded} embedded, "
        f"{s['failed']} failed"
    )

    # 3. bare model on the same texts
    batch = settings.embed_max_segments
    say(f"bare:   embedding {len(texts)} texts in batches of {batch}, x{args.repeat}")
    meter.other_cores()
    bare = bare_model(settings, texts, batch, args.repeat)
    bare["other_processes_cores"] = meter.other_cores()
    bare["segment_rows"] = segment_rows
    bare["tokens_per_segment_mean"] = mean_tokens
    result["bare"] = bare

    # 4. ratios
    ratio = cold["segments_per_s"] / bare["segments_per_s"] if bare["segments_per_s"] else None
    result["ratio"] = round(ratio, 3) if ratio is not None else None
    # fixed start-up: until every group has joined and the model is loaded
    # (lazy load: after the first segments arrive; eager: overlapping the joins)
    fixed = max(cold.get("groups_joined_s", 0.0), cold.get("model_ready_s", 0.0))
    steady_s = cold["seconds"] - fixed
    steady = None
    if "groups_joined_s" in cold and steady_s > 0 and bare["segments_per_s"]:
        steady = embedded / steady_s / bare["segments_per_s"]
    result["ratio_excluding_startup"] = round(steady, 3) if steady is not None else None
    result["startup_s"] = round(fixed, 3)
    teardown = cold.get("teardown_s")
    steady2 = None
    if teardown is not None and steady_s - teardown > 0 and bare["segments_per_s"]:
        steady2 = embedded / (steady_s - teardown) / bare["segments_per_s"]
    result["ratio_excluding_startup_and_teardown"] = round(steady2, 3) if steady2 else None
    embed_only = (
        embedded / cold["embed_busy_s"] / bare["segments_per_s"]
        if cold["embed_busy_s"] and bare["segments_per_s"]
        else None
    )
    result["model_speed_inside_pipeline"] = round(embed_only, 3) if embed_only else None
    # The CPU the cold run cost, spread over every core, is the least wall time
    # any scheduling of that work could take: bare seconds over it bounds the ratio.
    cores = len(os.sched_getaffinity(0))
    if cold.get("own_cpu_s") and bare.get("cpu_s"):
        result["cpu"] = {
            "cores": cores,
            "cold_cpu_s": cold["own_cpu_s"],
            "cold_cores_busy": round(cold["own_cpu_s"] / cold["seconds"], 2),
            "bare_cpu_s": bare["cpu_s"],
            "bare_cores_busy": round(bare["cpu_s"] / bare["median_s"], 2),
            "pipeline_cpu_beyond_model_s": round(cold["own_cpu_s"] - bare["cpu_s"], 2),
            "ratio_ceiling": round(bare["median_s"] / (cold["own_cpu_s"] / cores), 3),
        }

    # 5. re-index, unchanged
    say("reindex: same corpus, same home")
    with container_for(home) as c:
        before = counts(c)
        reindex = run_index(c, corpus_dir, force=False, joins=joins)
        after = counts(c)
    reindex["counts_before"], reindex["counts_after"] = before, after
    result["reindex"] = reindex
    rs = reindex["summary"]
    result["checks"]["reindex_embedded_zero"] = rs["embedded"] == 0
    result["checks"]["reindex_nothing_published"] = rs["published"] == 0
    result["checks"]["reindex_counts_unchanged"] = before == after == cold_counts

    # 6. forced replay
    say("replay: index_paths(force=True), every document through every stage")
    with container_for(home) as c:
        probe = EmbedProbe(c.provider)
        before = counts(c)
        replay = run_index(c, corpus_dir, force=True, joins=joins)
        after = counts(c)
        replay["model_loaded"] = "_st" in c.provider.__dict__
        replay["embed_calls"] = len(probe.calls)
    replay["counts_before"], replay["counts_after"] = before, after
    result["replay"] = replay
    ps = replay["summary"]
    result["checks"]["replay_all_republished"] = ps["published"] == ps["documents"]
    result["checks"]["replay_embedded_zero"] = ps["embedded"] == 0
    result["checks"]["replay_counts_unchanged"] = before == after == cold_counts
    result["checks"]["replay_all_completed"] = ps["completed"] == ps["documents"]

    result["machine"]["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    logging.getLogger().removeHandler(fh)
    fh.close()
    result["log"] = str(home / "kbstream.log")
    if args.stages:
        from benchmarks import stages

        release_milvus_lite()
        say("stages: each stage alone on the same corpus, fresh home")
        result["stages"] = stages.capacity(files, corpus_dir, work / "stages-home")
        result["checks"]["stages_all_completed"] = (
            result["stages"]["completed"] == result["stages"]["documents"]
        )
    ok = all(result["checks"].values())
    result["ok"] = ok
    print(render(result, args.repeat))
    if args.stages:
        print()
        print(stages.render(result["stages"]))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log_copy = args.out.with_suffix(".log")
    shutil.copyfile(home / "kbstream.log", log_copy)
    result["log"] = str(log_copy)
    release_milvus_lite()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"kept:   {work}")
    say(f"wrote:  {args.out} (pipeline log: {log_copy})")
    print(json.dumps(result, separators=(",", ":")))
    return 0 if ok else 1


def opt_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def render(r: dict[str, Any], repeat: int) -> str:
    m, cold, bare = r["machine"], r["cold"], r["bare"]
    cs = cold["summary"]
    f1: Callable[[float | None], str] = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    out = []
    out.append(
        fmt_table(
            [
                ("cores (os.cpu_count)", str(m["cpu_cores"])),
                ("torch threads / interop", f"{m['torch_threads']} / {m['torch_interop_threads']}"),
                ("torch / python", f"{m['torch']} / {m['python']}"),
                (
                    "1-min load average start / end",
                    f"{m['loadavg_at_start']} / {m.get('loadavg_at_end', 'n/a')}",
                ),
                (
                    "corpus",
                    f"{r['corpus']['files']} HTML files, {r['corpus']['bytes'] / 1024:.0f} KiB "
                    f"({r['corpus']['first']} .. {r['corpus']['last']})",
                ),
            ],
            "machine",
        )
    )
    join = cold.get("groups_joined_s")
    out.append(
        fmt_table(
            [
                ("documents completed / failed", f"{cs['completed']} / {cs['failed']}"),
                ("segments / embedded", f"{cs['segments']} / {cs['embedded']}"),
                ("wall clock (everything)", f"{cold['seconds']:.2f} s"),
                ("  start -> all events published", opt_s(cold.get("published_s"))),
                ("  published -> all completed", opt_s(cold.get("published_to_done_s"))),
                ("  start -> all 6 groups joined", opt_s(join)),
                (
                    f"  model load (in thread {cold.get('model_loaded_by')})",
                    f"{cold['model_load_s']:.2f} s",
                ),
                ("  start -> model loaded", opt_s(cold.get("model_ready_s"))),
                ("  embed stage busy in provider.embed", f"{cold['embed_busy_s']:.2f} s"),
                (
                    "  first Milvus upsert (opens milvus-lite)",
                    opt_s(cold.get("first_milvus_upsert_s")),
                ),
                ("  all completed -> returned (teardown)", opt_s(cold.get("teardown_s"))),
                (
                    "  embed calls / texts per call",
                    f"{cold['embed_calls']} / mean {cold['embed_texts_per_call_mean']}, "
                    f"max {cold['embed_texts_per_call_max']}",
                ),
                (
                    "  model segments/s in 2nd half of embed calls",
                    f1(cold.get("embed_late_half_segments_per_s")),
                ),
                ("other processes' CPU (avg cores)", str(cold["other_processes_cores"])),
                ("end-to-end segments/s", f1(cold["segments_per_s"])),
            ],
            "cold end-to-end (fresh home)",
        )
    )
    out.append(
        fmt_table(
            [
                ("texts (distinct doc_hash)", f"{bare['texts']} of {bare['segment_rows']} rows"),
                ("tokens per segment (mean)", str(bare["tokens_per_segment_mean"])),
                ("batch / encode batch_size", f"{bare['batch']} / {bare['encode_batch_size']}"),
                (f"seconds (median of {repeat})", f"{bare['median_s']:.2f}  {bare['runs_s']}"),
                ("other processes' CPU (avg cores)", str(bare["other_processes_cores"])),
                ("bare-model segments/s (median)", f1(bare["segments_per_s"])),
                ("  best run", f1(bare["best_segments_per_s"])),
            ],
            "bare model, same texts, same process",
        )
    )
    out.append(
        fmt_table(
            [
                ("RATIO end-to-end / bare model", f1(r["ratio"])),
                (
                    f"ratio excl. start-up ({r['startup_s']:.1f} s: until joined + model loaded)",
                    f1(r["ratio_excluding_startup"]),
                ),
                (
                    "ratio excl. start-up and teardown",
                    f1(r["ratio_excluding_startup_and_teardown"]),
                ),
                ("model speed inside pipeline / bare", f1(r["model_speed_inside_pipeline"])),
            ],
            "=== RATIO ===",
        )
    )
    if "cpu" in r:
        cpu = r["cpu"]
        out.append(
            fmt_table(
                [
                    (
                        "cold: CPU seconds (this process, broker, milvus-lite)",
                        f"{cpu['cold_cpu_s']:.1f} s, {cpu['cold_cores_busy']} cores busy",
                    ),
                    (
                        "bare: CPU seconds",
                        f"{cpu['bare_cpu_s']:.1f} s, {cpu['bare_cores_busy']} cores busy",
                    ),
                    (
                        "pipeline's CPU beyond the model",
                        f"{cpu['pipeline_cpu_beyond_model_s']:.1f} s",
                    ),
                    (
                        f"ratio ceiling on {cpu['cores']} cores (bare s / (cold CPU s / cores))",
                        f1(cpu["ratio_ceiling"]),
                    ),
                ],
                "where the CPU went",
            )
        )
    busy = max(cold["other_processes_cores"], bare["other_processes_cores"])
    if busy >= 0.2:
        out.append(
            f"WARNING: other processes kept {busy} cores busy during a timed phase "
            f"(cold {cold['other_processes_cores']}, bare {bare['other_processes_cores']}); "
            "the ratio is skewed by that. Run again on a quiet machine or use --repeat."
        )
    for key, title in (("reindex", "re-index unchanged corpus"), ("replay", "forced replay")):
        ph = r[key]
        s = ph["summary"]
        rows = [
            ("wall clock", f"{ph['seconds']:.2f} s"),
            ("published / skipped", f"{s['published']} / {s['skipped']}"),
            ("completed / failed", f"{s['completed']} / {s['failed']}"),
            ("embedded / cache hits", f"{s['embedded']} / {s['cache_hits']}"),
        ]
        if "published_to_done_s" in ph:
            rows.append(("  start -> all 6 groups joined", opt_s(ph.get("groups_joined_s"))))
            rows.append(("  published -> all completed", opt_s(ph["published_to_done_s"])))
            rows.append(("  all completed -> returned (teardown)", opt_s(ph.get("teardown_s"))))
            rows.append(
                (
                    "split: segments sent on / kept",
                    f"{ph.get('split_sent_on', 0)} / {ph.get('split_kept', 0)}",
                )
            )
        if "model_loaded" in ph:
            rows.append(("model loaded", str(ph["model_loaded"])))
        b, a = ph["counts_before"], ph["counts_after"]
        for k in ("segments", "vectors", "keyword_entities"):
            rows.append((f"{k} before -> after", f"{b[k]} -> {a[k]}"))
        out.append(fmt_table(rows, title))
    checks = [(k, "ok" if v else "FAILED") for k, v in r["checks"].items()]
    out.append(fmt_table(checks, "checks"))
    return "\n\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
