"""Wiring the metrics and health port of a process that runs stages (`kbstream
worker`, `kbstream up`), and the database reads that `kbstream top` and the
documents gauges share."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from sqlalchemy import func, select

from consumers.pipeline import PIPELINE, STAGES, Progress, stage_spec
from domain.documents import IndexingStatus
from infra import metrics
from infra.db.database import Database
from infra.db.models import DocumentRow, EmbeddingRow, SegmentRow
from infra.health import Readiness, loops_ready, serve
from infra.kafka import observe
from infra.kafka.topics import Topics
from kbstream.bootstrap import Container
from kbstream.settings import Settings
from kbstream.supervisor import MULTIPROC_ENV, ready_file

if TYPE_CHECKING:
    from kbstream.supervisor import WorkerSupervisor

log = logging.getLogger(__name__)

PENDING = [s.value for s in IndexingStatus if not s.finished]


def stage_groups(settings: Settings) -> dict[str, tuple[str, list[str]]]:
    """stage -> (consumer group, physical input topics)."""
    topics = Topics(settings.topic_prefix)
    return {
        s: (settings.group(stage_spec(s).group), [topics.name(t) for t in stage_spec(s).inputs])
        for s in STAGES
    }


def status_snapshot(db: Database) -> metrics.StatusSnapshot:
    """Documents by status, and the age of the oldest one not finished (from
    when its current version was claimed by parse, or created if not yet)."""
    with db.connect() as conn:
        counts = dict(
            conn.execute(
                select(DocumentRow.status, func.count()).group_by(DocumentRow.status)
            ).all()
        )
        since = func.coalesce(DocumentRow.parsing_started_at, DocumentRow.created_at)
        oldest = conn.execute(
            select(func.min(since)).where(DocumentRow.status.in_(PENDING))
        ).scalar()
    age = 0.0
    if oldest is not None:
        if oldest.tzinfo is None:  # SQLite hands back naive UTC
            oldest = oldest.replace(tzinfo=UTC)
        age = max(0.0, (datetime.now(UTC) - oldest).total_seconds())
    return metrics.StatusSnapshot({str(k): int(v) for k, v in counts.items()}, age)


def segment_progress(db: Database) -> dict[str, int]:
    """What each stage has done to segments, as counts in the database (top
    turns successive reads into segments/s)."""
    seg = select(func.count()).select_from(SegmentRow)
    counts = {
        Progress.SEGMENTS: seg,
        Progress.EMBEDDINGS: select(func.count()).select_from(EmbeddingRow),
        Progress.VECTOR_INDEXED: seg.where(SegmentRow.vector_indexed.is_(True)),
        Progress.KEYWORDS_INDEXED: seg.where(SegmentRow.keywords_indexed.is_(True)),
        Progress.COMPLETED: seg.where(SegmentRow.status == IndexingStatus.COMPLETED.value),
    }
    queries = {s.name: counts[s.progress] for s in PIPELINE if s.progress is not None}
    with db.connect() as conn:
        return {stage: int(conn.execute(q).scalar() or 0) for stage, q in queries.items()}


def _readiness(
    c: Container, brokers: str, stages: Sequence[str], workers: WorkerSupervisor | None
) -> Readiness:
    from confluent_kafka.admin import AdminClient
    from sqlalchemy import text

    from infra.kafka.security import client_config

    admin = AdminClient(client_config(brokers))

    def broker() -> None:
        admin.list_topics(timeout=3)

    def database() -> None:
        with c.database.connect() as conn:
            conn.execute(text("SELECT 1"))

    checks = {"broker": broker, "database": database}
    if any(stage_spec(s).ready_needs_milvus for s in stages):
        checks["milvus"] = lambda: c.vectors.client.list_collections()
    return Readiness(checks, also=workers.not_ready if workers else None).start()


def start_observability(
    settings: Settings,
    c: Container,
    brokers: str,
    stages: Sequence[str],
    workers: WorkerSupervisor | None = None,
) -> Readiness | None:
    """Serve /metrics, /healthz, /readyz on KBSTREAM_METRICS_PORT (if set) for a
    process running ``stages`` as threads. Only a process running track_status
    exports the documents gauges, so a dashboard's sum is not multiplied by the
    pod count.

    ``workers`` (`up --workers`) with a metrics dir: /metrics is the aggregate
    of this process and the workers (multiprocess mode), the documents gauges
    are computed here if any of them runs track_status, and /readyz waits for
    every worker too. A worker of `up` (no port, PROMETHEUS_MULTIPROC_DIR set)
    only reports, with its ready file, that it has joined its group."""
    if not settings.metrics_port:
        if MULTIPROC_ENV in os.environ:
            _report_ready(Path(os.environ[MULTIPROC_ENV]))
        return None
    registry = REGISTRY
    exporting = list(stages)
    if workers is not None and workers.metrics_dir is not None:
        registry = _multiprocess_registry(workers.metrics_dir)
        exporting += [s.stage for s in workers.slots]
    if any(stage_spec(s).exports_document_gauges for s in exporting):
        registry.register(metrics.DocumentStatusCollector(lambda: status_snapshot(c.database)))
    readiness = _readiness(c, brokers, exporting, workers)
    serve(settings.metrics_port, readiness, registry=registry)
    return readiness


def _multiprocess_registry(metrics_dir: Path) -> CollectorRegistry:
    if not metrics.MULTIPROCESS:  # this process's own stage metrics would be missing
        raise RuntimeError(
            f"prometheus_client was imported before {MULTIPROC_ENV} was set; "
            "kbstream up must set it first"
        )
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    return registry


def _report_ready(metrics_dir: Path, interval: float = 0.5) -> threading.Event:
    """Keep ready-PID in ``metrics_dir`` while every stage loop of this process has
    joined its group (what `up`'s /readyz reads for its workers); set the
    returned event to stop."""
    path = ready_file(metrics_dir, os.getpid())
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if not loops_ready():
                path.unlink(missing_ok=True)
            elif not path.exists():
                path.write_text(",".join(o.stage for o in observe.loops()))
            stop.wait(interval)

    threading.Thread(target=loop, name="ready-file", daemon=True).start()
    return stop
