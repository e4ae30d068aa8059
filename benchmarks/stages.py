"""kbstream per-stage capacity: each stage alone, on prepared input, in segments/s.

One command, from the repository root:

    .venv/bin/python benchmarks/stages.py [--docs N] [--corpus DIR] [--out FILE] [--keep]

Every stage is built from the pipeline table (consumers/pipeline.py) over a real
Container on a temporary home (SQLite, milvus-lite, the bundled model, the real
FileReader), exactly as a worker builds it. The stages run in the table's order, in
this one process and without a broker: each one's input is what the stages before it
emitted on its input topics. Only ``stage.handle(batch)`` is timed, over the whole
input in batches of the stage's ``max_batch``; one-off costs (database migration,
model load, milvus-lite start, jieba's dictionary, the extraction forkserver) are paid
before the clock starts.

"segments" is the corpus's segment count for every stage, so the segments/s column
compares stages in the unit the end-to-end benchmark uses: the slowest stage is the
ceiling of the whole pipeline. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402  (the path above first; clears KBSTREAM_* too)
    DATASET,
    DEFAULT_DOCS,
    MODEL_SETTINGS,
    pick_corpus,
    release_milvus_lite,
    say,
)


@dataclass
class StageTiming:
    stage: str
    max_batch: int
    events: int = 0
    batches: int = 0
    seconds: float = 0.0
    emitted: int = 0
    rejected: int = 0
    batch_seconds: list[float] = field(default_factory=list)


def make_settings(home: Path, corpus: Path) -> Any:
    from kbstream.settings import Settings

    # explicit, as benchmarks/run.py: embedded everything; parse may read the corpus
    return Settings(
        home=home,
        brokers=None,
        database_url=None,
        milvus_uri=None,
        allowed_roots=str(corpus),
        **MODEL_SETTINGS,
    )


def lifecycle_events(container: Any, corpus: Path) -> list[Any]:
    """One document.created per file, as `kbstream index` plans them."""
    from domain.events import DocumentCreated
    from producers.files import discover

    tenant = container.settings.tenant
    return [
        DocumentCreated(
            tenant_id=tenant,
            dataset_id=DATASET,
            document_id=f.document_id,
            source=str(f.path),
            uri=f.uri,
            content_hash=f.content_hash,
            version=1,
        )
        for f in discover([corpus], tenant, DATASET)
    ]


def warm_up(container: Any, files: Sequence[Path]) -> None:
    """Pay every one-off cost before any clock starts."""
    with container.uow(readonly=True) as uow:  # migrations
        uow.documents.list(container.settings.tenant, DATASET)
    container.provider.warm_up()  # model load
    container.vectors.ids_for_document(_any_key(container))  # milvus-lite start, collection
    container.keywords.terms("warm up the dictionary")  # jieba's dictionary
    container.keyword_index.count(container.settings.tenant, DATASET)  # keyword collection
    container.tokens.count_tokens("warm up")
    # the forkserver that isolates large documents: started by the largest file
    largest = max(files, key=lambda p: p.stat().st_size)
    container.reader.read(None, largest.as_uri(), None)


def _any_key(container: Any) -> Any:
    from domain.documents import DocKey

    return DocKey(container.settings.tenant, DATASET, "warm-up")


def run_stage(
    stage: Any, events: Sequence[Any], profile: Path | None = None
) -> tuple[StageTiming, list[Any]]:
    timing = StageTiming(stage.name, stage.max_batch, events=len(events))
    emits: list[Any] = []
    profiler = cProfile.Profile() if profile else None
    for i in range(0, len(events), stage.max_batch):
        batch = events[i : i + stage.max_batch]
        t = time.perf_counter()
        if profiler is not None:
            result = profiler.runcall(stage.handle, batch)
        else:
            result = stage.handle(batch)
        took = time.perf_counter() - t
        timing.batch_seconds.append(took)
        timing.seconds += took
        timing.batches += 1
        timing.emitted += len(result.emits)
        timing.rejected += len(result.rejected)
        for r in result.rejected:
            say(f"  {stage.name}: rejected {r.event.type} {r.event.document_id}: {r.error}")
        emits.extend(result.emits)
    if profiler is not None and profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(profile / f"{stage.name}.prof")
    return timing, emits


def capacity(
    files: Sequence[Path], corpus: Path, home: Path, profile: Path | None = None
) -> dict[str, Any]:
    """Run every stage of the pipeline table alone over the corpus in ``corpus``."""
    from consumers.pipeline import PIPELINE
    from domain.events import SegmentsSplit, Topic
    from kbstream.bootstrap import Container

    container = Container(make_settings(home, corpus))
    try:
        say("stages: warming up (migrations, model, milvus-lite, jieba, forkserver)")
        warm_up(container, files)
        queues: dict[Topic, list[Any]] = {t: [] for t in Topic}
        queues[Topic.LIFECYCLE] = lifecycle_events(container, corpus)
        timings: list[StageTiming] = []
        for spec in PIPELINE:
            stage = spec.build(container)
            inputs = [e for topic in spec.inputs for e in queues[topic]]
            say(f"stages: {spec.name}: {len(inputs)} events, batches of {stage.max_batch}")
            timing, emits = run_stage(stage, inputs, profile)
            for emit in emits:
                queues[emit.topic].append(emit.event)
            timings.append(timing)
        segments = sum(
            len(e.segments) for e in queues[Topic.SEGMENTS] if isinstance(e, SegmentsSplit)
        )
        with container.uow(readonly=True) as uow:
            docs = uow.documents.list(container.settings.tenant, DATASET)
        completed = sum(1 for d in docs if d.status.value == "completed")
    finally:
        container.close()
        release_milvus_lite(container.settings.vector_uri)
    slowest = max(t.seconds for t in timings) or 1e-9
    rows = [
        {
            "stage": t.stage,
            "max_batch": t.max_batch,
            "events": t.events,
            "batches": t.batches,
            "segments": segments,
            "seconds": round(t.seconds, 3),
            "segments_per_s": round(segments / t.seconds, 1) if t.seconds else None,
            "share_of_slowest": round(t.seconds / slowest, 3),
            "slowest_batch_s": round(max(t.batch_seconds, default=0.0), 3),
            "emitted": t.emitted,
            "rejected": t.rejected,
        }
        for t in timings
    ]
    return {
        "documents": len(files),
        "completed": completed,
        "segments": segments,
        "cpu_cores": os.cpu_count(),
        "loadavg": round(os.getloadavg()[0], 2),
        "stages": rows,
        "bottleneck": max(timings, key=lambda t: t.seconds).stage,
    }


def render(result: dict[str, Any]) -> str:
    head = ("stage", "events", "segments", "seconds", "segments/s", "share of slowest")
    lines = [
        f"per-stage capacity: {result['documents']} documents, {result['segments']} segments, "
        f"{result['completed']} completed ({result['cpu_cores']} cores, "
        f"load {result['loadavg']})",
        "  ".join(f"{h:>{w}}" for h, w in zip(head, (14, 7, 9, 8, 11, 17), strict=True)),
    ]
    for r in result["stages"]:
        rate = "n/a" if r["segments_per_s"] is None else f"{r['segments_per_s']:.1f}"
        lines.append(
            f"{r['stage']:>14}  {r['events']:>7}  {r['segments']:>9}  {r['seconds']:>8.2f}  "
            f"{rate:>11}  {r['share_of_slowest']:>17.2f}"
        )
    lines.append(f"bottleneck: {result['bottleneck']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--docs", type=int, default=DEFAULT_DOCS, help=f"HTML pages (default {DEFAULT_DOCS})"
    )
    ap.add_argument("--corpus", type=Path, help="HTML folder instead of python3.11-doc")
    ap.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="cProfile each stage into DIR/<stage>.prof (slows the stages down)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary home (path printed)")
    ap.add_argument(
        "--embedder",
        choices=["model", "free"],
        default="model",
        help="free: a near-zero-cost OpenAI-compatible server (benchmarks/free.py)",
    )
    ap.add_argument(
        "--small", type=int, help="N small documents cut from the pages instead (free.py's)"
    )
    args = ap.parse_args(argv)
    if args.docs < 1:
        ap.error("--docs must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="kbstream-stages-"))
    try:
        with ExitStack() as stack:
            files = pick_corpus(args.corpus, args.docs, work / "pages")
            corpus = work / "pages"
            if args.small:
                from benchmarks.free import small_documents

                files = small_documents(files, args.small, work / "small")
                corpus = work / "small"
            if args.embedder == "free":
                from benchmarks.free import free_server, model_env

                base_url, _ = stack.enter_context(free_server())
                MODEL_SETTINGS.update(
                    (k.removeprefix("KBSTREAM_").lower(), v) for k, v in model_env(base_url).items()
                )
            result = capacity(files, corpus, work / "home", args.profile)
    finally:
        if args.keep:
            say(f"kept:   {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))
    return 0 if result["completed"] == result["documents"] else 1


if __name__ == "__main__":
    sys.exit(main())
