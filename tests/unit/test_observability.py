"""Unit tests of the observability pieces: the JSON log formatter and its
context, the health endpoints' answers, the embedding call metrics, segment
counting, the documents collector, and the multiprocess mode of `up
--workers` (aggregation over real processes, worker readiness, dead workers)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from consumers.contract import StageResult
from domain.events import DocumentCreated, SegmentPayload, SegmentsSplit, Topic
from infra import metrics
from infra.health import Readiness, make_app
from infra.kafka import observe
from infra.logs import ContextFilter, json_formatter
from kbstream.observability import _report_ready
from kbstream.supervisor import MULTIPROC_ENV, WorkerSupervisor, fresh_metrics_dir, ready_file
from tests.fakes import HashingEmbeddingDouble
from tests.polling import poll

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(json_formatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("kbstream.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, buf
    logger.removeHandler(handler)


def created(doc: str, version: int = 1) -> DocumentCreated:
    return DocumentCreated(
        dataset_id="d", document_id=doc, source="a.md", content="x", version=version
    )


def test_json_log_lines_carry_stage_document_version_and_event_id(json_log: Any) -> None:
    logger, buf = json_log
    event = created("doc-1", 3)

    def in_a_stage_thread() -> None:
        observe.bind_stage("parse")
        observe.bind_events([event])
        logger.warning("handling %s", "it")
        observe.bind_events(())
        logger.info("between batches")

    t = threading.Thread(target=in_a_stage_thread)
    t.start()
    t.join()
    logger.info("no stage here")  # another thread: its own, empty context
    first, between, outside = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["message"] == "handling it" and first["level"] == "WARNING"
    assert (first["stage"], first["document"], first["version"]) == ("parse", "doc-1", 3)
    assert first["event_id"] == event.event_id
    assert {"time", "logger", "thread"} <= set(first)
    assert between["stage"] == "parse" and "document" not in between
    assert "stage" not in outside


def test_json_log_batch_context_lists_every_event(json_log: Any) -> None:
    logger, buf = json_log
    events = [created("a"), created("b", 2)]
    observe.bind_stage("split")
    observe.bind_events(events)
    try:
        logger.info("batch")
    finally:
        observe.bind_events(())
    line = json.loads(buf.getvalue())
    assert line["document"] == ["a", "b"] and line["version"] == [1, 2]


def call(app: Any, path: str) -> tuple[str, bytes]:
    got: dict[str, str] = {}

    def start(status: str, headers: list[tuple[str, str]]) -> None:
        got["status"] = status

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start))
    return got["status"], body


def test_readyz_names_what_is_not_ready_until_it_is() -> None:
    db_up = {"ok": False}

    def database() -> None:
        if not db_up["ok"]:
            raise ConnectionError("refused")

    ready = threading.Event()
    loop = observe.LoopObserver("embed", "kb.embed", ready)
    readiness = Readiness({"database": database, "broker": lambda: None})
    app = make_app(readiness)
    try:
        assert call(app, "/healthz") == ("200 OK", b"ok\n")
        status, body = call(app, "/readyz")  # nothing checked yet
        assert status.startswith("503") and "database" in json.loads(body)["not_ready"]
        readiness.check_now()
        status, body = call(app, "/readyz")
        missing = json.loads(body)["not_ready"]
        assert status.startswith("503")
        assert set(missing) == {"database", "stage embed"} and "refused" in missing["database"]
        db_up["ok"] = True
        ready.set()
        readiness.check_now()
        assert call(app, "/readyz")[0] == "200 OK"
        assert call(app, "/metrics")[0] == "200 OK"
    finally:
        loop.close()


def test_measured_embedder_records_latency_and_batch_size() -> None:
    inner = HashingEmbeddingDouble()
    embedder = metrics.MeasuredEmbedder(inner)
    before = metrics.EMBED_BATCH._sum.get()  # type: ignore[attr-defined]
    vectors = embedder.embed(["a", "b", "c"])
    assert len(vectors) == 3 and (embedder.provider, embedder.dim) == (inner.provider, inner.dim)
    assert metrics.EMBED_BATCH._sum.get() - before == 3  # type: ignore[attr-defined]


def segments_split(n: int) -> SegmentsSplit:
    segs = [
        SegmentPayload(index_node_id=f"n{i}", doc_hash=f"h{i}", position=i, content="t")
        for i in range(n)
    ]
    return SegmentsSplit(dataset_id="d", document_id="x", version=1, segments=segs)


def test_segments_are_counted_from_inputs_or_else_from_emits() -> None:
    def counted(stage: str) -> float:
        return metrics.SEGMENTS.labels(stage)._value.get()  # type: ignore[attr-defined,no-any-return]

    split_before, embed_before = counted("split"), counted("embed")
    out = StageResult()
    out.emit(Topic.SEGMENTS, segments_split(4))
    observe.record_result("split", [created("x")], out)  # a parsed document carries none
    observe.record_result("embed", [segments_split(2)], StageResult())
    assert counted("split") - split_before == 4
    assert counted("embed") - embed_before == 2


def test_documents_collector_caches_and_survives_a_down_database() -> None:
    reads = {"n": 0, "fail": False}

    def read() -> metrics.StatusSnapshot:
        reads["n"] += 1
        if reads["fail"]:
            raise ConnectionError("down")
        return metrics.StatusSnapshot({"completed": 2, "indexing": 1}, 12.5)

    registry = CollectorRegistry()
    collector = metrics.DocumentStatusCollector(read, ttl=60)
    registry.register(collector)
    assert reads["n"] == 0  # registering does not query
    text = generate_latest(registry).decode()
    generate_latest(registry)
    assert reads["n"] == 1
    assert 'kbstream_documents{status="completed"} 2.0' in text
    assert "kbstream_oldest_pending_document_age_seconds 12.5" in text
    collector.ttl = 0
    reads["fail"] = True
    assert "kbstream_documents" not in generate_latest(registry).decode()


# -- `kbstream up --workers`: prometheus-client multiprocess mode ---------------

# one worker process of `up`: its stage loop's metrics, written to PROMETHEUS_MULTIPROC_DIR
WORKER = """
import os, sys, warnings
warnings.simplefilter("error")  # zeroing a revoked lag series must not warn
from infra import metrics
assert metrics.MULTIPROCESS
events, partition, lag, revoke = sys.argv[1:]
metrics.EVENTS.labels("parse").inc(int(events))
metrics.STAGE_READY.labels("parse").set(1)
metrics.CONSUMER_LAG.labels("kb.parse", "kb.lifecycle", partition).set(int(lag))
if revoke:  # its partition went to the other member
    metrics.CONSUMER_LAG.remove("kb.parse", "kb.lifecycle", partition)
print(os.getpid())
"""


def run_worker(metrics_dir: Path, *args: str) -> int:
    env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, *args],
        cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return int(out.stdout)


def aggregate(metrics_dir: Path) -> dict[tuple[str, tuple[str, ...]], float]:
    """(name, label values in label-name order) -> value, as `up` serves them."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    return {
        (s.name, tuple(v for _, v in sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


LAG = ("kbstream_consumer_lag", ("kb.parse", "0", "kb.lifecycle"))  # group, partition, topic


def test_multiprocess_aggregate_sums_counters_and_live_gauges(tmp_path: Path) -> None:
    first = run_worker(tmp_path, "3", "0", "5", "revoke")  # owned partition 0, then lost it
    second = run_worker(tmp_path, "2", "0", "7", "")  # owns partition 0 now
    agg = aggregate(tmp_path)
    assert agg[("kbstream_events_total", ("parse",))] == 5
    assert agg[LAG] == 7
    assert agg[("kbstream_stage_ready", ("parse",))] == 2  # ready members, as over pods
    multiprocess.mark_process_dead(second, str(tmp_path))  # what the supervisor does
    agg = aggregate(tmp_path)
    assert agg[("kbstream_events_total", ("parse",))] == 5  # counters outlive their process
    assert agg[LAG] == 0
    assert agg[("kbstream_stage_ready", ("parse",))] == 1
    assert first != second


def test_up_sets_the_multiprocess_dir_before_prometheus_client_is_imported(
    tmp_path: Path,
) -> None:
    # what `up` does before it sets PROMETHEUS_MULTIPROC_DIR: prometheus_client
    # decides on multiprocess mode when it is first imported
    code = (
        "import sys, kbstream.cli.running, kbstream.supervisor\n"
        "from kbstream.cli.common import cli_settings\n"
        f"cli_settings({str(tmp_path)!r}, running_stack=False)\n"
        "assert 'prometheus_client' not in sys.modules, 'imported too early'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_a_fresh_metrics_dir_drops_an_earlier_runs_files(tmp_path: Path) -> None:
    stale = tmp_path / "metrics" / "counter_123.db"
    stale.parent.mkdir()
    stale.write_bytes(b"x")
    assert fresh_metrics_dir(tmp_path) == stale.parent
    assert list(stale.parent.iterdir()) == []


WRITES_ENV = (
    "import os, sys, time\n"
    "open(sys.argv[1], 'w').write(repr((os.environ.get('PROMETHEUS_MULTIPROC_DIR'),"
    " os.environ.get('KBSTREAM_METRICS_PORT'))))\n"
    "while True: time.sleep(0.1)"
)


def test_supervisor_reports_worker_readiness_and_marks_dead_workers(tmp_path: Path) -> None:
    metrics_dir = fresh_metrics_dir(tmp_path)
    seen = tmp_path / "env"
    sup = WorkerSupervisor(
        {"parse": 1},
        {**os.environ, "KBSTREAM_METRICS_PORT": "9100"},
        command=lambda _s: [sys.executable, "-c", WRITES_ENV, str(seen)],
        metrics_dir=metrics_dir,
        backoff=30,
    ).start()
    try:
        pid = sup.pids()["parse"][0]
        assert "has not joined" in sup.not_ready()["worker parse#1"]
        assert poll(seen.exists, 10)
        assert poll(lambda: seen.read_text() == repr((str(metrics_dir), None)), 5)
        ready_file(metrics_dir, pid).write_text("parse")
        live, counter = metrics_dir / f"gauge_livesum_{pid}.db", metrics_dir / f"counter_{pid}.db"
        live.write_bytes(b"")
        counter.write_bytes(b"")
        assert sup.not_ready() == {}
        os.kill(pid, signal.SIGKILL)
        assert poll(lambda: (sup.poll(), not sup.pids())[1], 5)
        assert "not running" in sup.not_ready()["worker parse#1"]
        assert not ready_file(metrics_dir, pid).exists() and not live.exists()
        assert counter.exists()
    finally:
        sup.stop(grace=5)


def test_a_worker_of_up_writes_its_ready_file_once_its_loops_joined(tmp_path: Path) -> None:
    ready = threading.Event()
    loop = observe.LoopObserver("parse", "kb.parse", ready)
    stop = _report_ready(tmp_path, interval=0.05)
    path = ready_file(tmp_path, os.getpid())
    try:
        time.sleep(0.2)
        assert not path.exists()
        ready.set()
        assert poll(path.exists, 5) and path.read_text() == "parse"
        loop.close()  # its loops stopped: not ready any more
        assert poll(lambda: not path.exists(), 5)
    finally:
        stop.set()
        loop.close()
