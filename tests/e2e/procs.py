"""Fault-injection helpers: every stage as a SEPARATE `kbstream worker`
process (what a pod runs) against the session's tansu broker, a PostgreSQL
database of its own and a milvus-lite server, so a test can SIGKILL and
restart workers, cut the database off, or feed the topics raw bytes.

The test process reads the results through the same Container the workers
use, and through the CLI (`kbstream verify`, `kbstream dlq`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from domain.documents import IndexingStatus
from domain.events import Event
from infra.kafka.producer import EventPublisher
from infra.kafka.topics import Topics, ensure_topics
from kbstream.bootstrap import Container
from kbstream.settings import Settings
from kbstream.stack import MilvusLiteServer
from tests.conftest import PG_ADMIN_URL
from tests.harness import wait_drained
from tests.polling import poll

REPO = Path(__file__).resolve().parents[2]
PIPELINE = ("parse", "split", "embed", "load_vectors", "index_keywords", "track_status")
FINISHED = (IndexingStatus.COMPLETED, IndexingStatus.ERROR, IndexingStatus.DELETED)
T = TypeVar("T")


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    return poll(pred, timeout, interval)


def retrying(fn: Callable[[], T], timeout: float = 60.0) -> T:
    """Call ``fn`` until it stops raising TransientError. The test process's
    Milvus connection can sit idle for a while, and the milvus-lite server
    (gRPC defaults) answers an idle client's keepalive pings with GOAWAY "too
    many pings"; the first call after that fails once. The workers retry such
    failures by policy; the test's own reads do the same here."""
    from domain.errors import TransientError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except TransientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


# --- a PostgreSQL database per test ------------------------------------------------


@contextlib.contextmanager
def fresh_database() -> Iterator[tuple[str, str]]:
    """(url, name) of a new, empty PostgreSQL database, dropped afterwards. Its
    own database lets a test cut every connection to it without touching the
    others."""
    import pytest

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"kbstream_fault_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - depends on the machine
        admin.dispose()
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url, name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            terminate_connections(conn, name)
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def terminate_connections(conn: Any, name: str) -> int:
    rows = conn.execute(
        text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = :n AND pid <> pg_backend_pid()"
        ),
        {"n": name},
    ).fetchall()
    return len(rows)


# --- worker processes -----------------------------------------------------------------


@dataclass
class Worker:
    stage: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def assigned(self) -> bool:
        """The runner logs its partition assignment; non-empty means consuming."""
        return f"stage {self.stage} assigned [(" in self.log_text()

    def subscribed(self) -> bool:
        """It asked to join its group: from now on the group rebalances."""
        return f"stage {self.stage} consuming" in self.log_text()

    def terminate(self) -> None:
        """SIGTERM without waiting: it commits, leaves its group and exits."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_exit(worker: Worker, timeout: float) -> int | None:
    """The worker's exit status once it has exited (-9: SIGKILLed); None if
    it is still running after ``timeout`` s."""
    try:
        return worker.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def wait_quiet(cluster: Cluster, quiet: float = 1.5, timeout: float = 30.0) -> bool:
    """Until no live worker has logged anything for ``quiet`` s: the stages
    have worked through what was in flight (late duplicates included)."""

    def size() -> int:
        return sum(w.log.stat().st_size for ws in cluster.workers.values() for w in ws if w.alive)

    deadline = time.monotonic() + timeout
    last, since = size(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = size()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
    return False


class Cluster:
    """A test's own pipeline: unique topic prefix on the shared broker, its own
    PostgreSQL database, its own milvus-lite server, one process per worker."""

    def __init__(
        self, root: Path, bootstrap: str, database_url: str, db_name: str = "", **settings: Any
    ) -> None:
        self.root = root
        self.db_name = db_name  # the PostgreSQL database, for tests that cut it off
        self.bootstrap = bootstrap
        self.database_url = database_url
        self.prefix = f"f{uuid.uuid4().hex[:10]}."
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.corpus = root / "corpus"
        self.corpus.mkdir(parents=True, exist_ok=True)
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (root / "milvus").mkdir(parents=True, exist_ok=True)
        self.milvus = MilvusLiteServer(root / "milvus" / "milvus.db").start()
        self.extra = settings
        self.workers: dict[str, list[Worker]] = {}
        self.kills = 0
        self.restarts = 0
        self._pub: EventPublisher | None = None
        self._n = 0
        ensure_topics(bootstrap, self.topics, self.settings.partitions)

    # -- configuration ---------------------------------------------------------------

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    @cached_property
    def settings(self) -> Settings:
        return Settings(
            home=self.home,
            brokers=self.bootstrap,
            database_url=self.database_url,
            milvus_uri=self.milvus.uri,
            topic_prefix=self.prefix,
            allowed_roots=str(self.corpus),
            **self.extra,
        )

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KBSTREAM_")}
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            KBSTREAM_HOME=str(self.home),
            KBSTREAM_BROKERS=self.bootstrap,
            KBSTREAM_TOPIC_PREFIX=self.prefix,
            KBSTREAM_DATABASE_URL=self.database_url,
            KBSTREAM_MILVUS_URI=self.milvus.uri,
            KBSTREAM_ALLOWED_ROOTS=str(self.corpus),
        )
        for k, v in self.extra.items():
            env[f"KBSTREAM_{k.upper()}"] = str(v)
        return env

    @cached_property
    def container(self) -> Container:
        return Container(self.settings)

    @property
    def tenant(self) -> str:
        return self.settings.tenant

    # -- workers -------------------------------------------------------------------------

    def start(self, stage: str, **env: str) -> Worker:
        """One `kbstream worker STAGE` process; ``env`` adds variables (e.g.
        KBSTREAM_METRICS_PORT) to this one only."""
        self._n += 1
        log = self.logs / f"{self._n:03d}-{stage}.log"
        fh = log.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "kbstream.cli", "worker", stage],
            cwd=REPO,
            env={**self.env(), **env},
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fh.close()
        w = Worker(stage, proc, log)
        self.workers.setdefault(stage, []).append(w)
        return w

    def start_all(
        self,
        stages: Iterable[str] = PIPELINE,
        timeout: float = 180.0,
        env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        started = [self.start(s, **(env or {}).get(s, {})) for s in stages]
        self.wait_assigned(started, timeout)

    def wait_assigned(self, workers: Sequence[Worker], timeout: float = 180.0) -> None:
        ok = wait_until(lambda: all(w.assigned() or not w.alive for w in workers), timeout)
        dead = [w for w in workers if not w.alive]
        if dead or not ok:
            raise AssertionError(
                "workers did not join their groups: "
                + "; ".join(f"{w.stage}: {w.log_text()[-2000:]}" for w in workers)
            )

    def live(self, stage: str) -> list[Worker]:
        return [w for w in self.workers.get(stage, []) if w.alive]

    def kill(self, worker: Worker) -> None:
        worker.kill()
        self.kills += 1

    def wait_subscribed(self, worker: Worker, timeout: float = 120.0) -> None:
        """Until ``worker`` has sent its join (its group is rebalancing)."""
        if not wait_until(lambda: worker.subscribed() or not worker.alive, timeout, 0.1):
            raise AssertionError(f"{worker.stage} never subscribed:\n{worker.log_text()[-2000:]}")
        if not worker.alive:
            raise AssertionError(f"{worker.stage} died starting:\n{worker.log_text()[-2000:]}")

    def restart(self, stage: str) -> Worker:
        self.restarts += 1
        return self.start(stage)

    def drain(self, timeout: float = 60.0) -> None:
        """Until the stages with a live worker have committed everything on
        their input topics: all the dead letters and events it causes are out."""
        wait_drained(self.settings, [s for s in self.workers if self.live(s)], timeout)

    def alive(self) -> dict[str, int]:
        """Live worker processes per stage."""
        return {s: len(self.live(s)) for s in self.workers}

    def stop_all(self) -> None:
        for ws in self.workers.values():
            for w in ws:
                w.stop()

    def close(self) -> None:
        self.stop_all()
        if self._pub is not None:
            self._pub.close()
            self._pub = None
        if "container" in self.__dict__:
            self.container.close()
        self.milvus.stop()

    def worker_logs(self, tail: int = 3000) -> str:
        out = []
        for ws in self.workers.values():
            for w in ws:
                out.append(f"--- {w.log.name} (rc={w.proc.poll()}) ---\n{w.log_text()[-tail:]}")
        return "\n".join(out)

    # -- driving -------------------------------------------------------------------------

    @property
    def publisher(self) -> EventPublisher:
        if self._pub is None:
            self._pub = EventPublisher(self.bootstrap, client_id="fault-test")
        return self._pub

    def publish(self, *events: Event, topic: str | None = None) -> None:
        for e in events:
            self.publisher.publish(topic or self.topics.lifecycle, e)
        self.publisher.flush()

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "kbstream.cli", *args],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kbstream {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def verify(self, dataset: str, repair: bool = False) -> tuple[int, dict[str, Any]]:
        args = ["verify", "--dataset", dataset, "--json"]
        if repair:
            args.append("--repair")
        proc = self.cli(*args, check=False)
        try:
            return proc.returncode, json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"verify printed no JSON:\n{proc.stdout}\n{proc.stderr}") from exc

    # -- observing -----------------------------------------------------------------------

    def snapshot(self, dataset: str) -> DatasetSnapshot:
        return retrying(lambda: DatasetSnapshot.take(self.container, self.tenant, dataset))

    def wait_settled(
        self,
        dataset: str,
        document_ids: Iterable[str],
        timeout: float,
        expected: Callable[[DatasetSnapshot], bool] | None = None,
    ) -> DatasetSnapshot:
        """Until every document is finished (completed, error or deleted), the
        three stores agree for each of them, and ``expected`` holds."""
        ids = set(document_ids)
        last: DatasetSnapshot | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.snapshot(dataset)
            last = snap
            if snap.settled(ids) and (expected is None or expected(snap)):
                return snap
            time.sleep(1.0)
        assert last is not None
        raise AssertionError(
            f"dataset {dataset} did not settle within {timeout}s: {last.summary(ids)}\n"
            f"workers alive: {self.alive()}\n{self.worker_logs(1500)}"
        )


@dataclass
class DatasetSnapshot:
    """What each store holds for one dataset, keyed by document."""

    docs: dict[str, Any]  # document_id -> domain.documents.Document
    segments: dict[str, str]  # index_node_id -> document_id
    seg_hash: dict[str, str]  # index_node_id -> doc_hash
    flags: dict[str, tuple[bool, bool]]  # index_node_id -> (vector_indexed, keywords_indexed)
    vectors: dict[str, tuple[str, int]]  # index_node_id -> (document_id, copies)
    texts: dict[str, str]  # index_node_id -> document_id in the keyword index
    # rows out of search: disabled segments, segments of disabled or archived documents
    hidden: set[str] = field(default_factory=set)

    @classmethod
    def take(cls, c: Container, tenant: str, dataset: str) -> DatasetSnapshot:
        from infra.db.models import SegmentRow

        with c.uow(readonly=True) as uow:
            docs = {d.document_id: d for d in uow.documents.list(tenant, dataset)}
        s = SegmentRow.__table__
        segments: dict[str, str] = {}
        seg_hash: dict[str, str] = {}
        flags: dict[str, tuple[bool, bool]] = {}
        hidden: set[str] = set()
        with c.database.connect() as conn:
            for r in conn.execute(
                select(
                    s.c.index_node_id,
                    s.c.document_id,
                    s.c.doc_hash,
                    s.c.vector_indexed,
                    s.c.keywords_indexed,
                    s.c.enabled,
                ).where(s.c.tenant_id == tenant, s.c.dataset_id == dataset)
            ):
                segments[r[0]] = r[1]
                seg_hash[r[0]] = r[2]
                flags[r[0]] = (bool(r[3]), bool(r[4]))
                doc = docs.get(r[1])
                if not (r[5] and doc is not None and doc.enabled and not doc.archived):
                    hidden.add(r[0])
        vectors = c.vectors.ids_with_duplicates(tenant, dataset)
        texts = c.keyword_index.ids(tenant, dataset)
        return cls(docs, segments, seg_hash, flags, vectors, texts, hidden)

    def doc_segments(self, doc_id: str) -> set[str]:
        return {n for n, d in self.segments.items() if d == doc_id}

    def doc_vectors(self, doc_id: str) -> set[str]:
        return {n for n, (d, _) in self.vectors.items() if d == doc_id}

    def doc_texts(self, doc_id: str) -> set[str]:
        return {n for n, d in self.texts.items() if d == doc_id}

    def status(self, doc_id: str) -> IndexingStatus | None:
        st = self.docs.get(doc_id)
        return st.status if st else None

    def problems(self, ids: Iterable[str] | None = None) -> list[str]:
        """Anything that is not an exact, finished state."""
        out = []
        wanted = set(self.docs) if ids is None else set(ids)
        for doc_id in sorted(wanted):
            st = self.docs.get(doc_id)
            if st is None:
                out.append(f"{doc_id}: no document row")
                continue
            if st.status not in FINISHED:
                out.append(f"{doc_id}: {st.status.value}")
                continue
            # what belongs in the indexes: a disabled segment's row stays, out of them
            segs = self.doc_segments(doc_id) - self.hidden
            vecs = self.doc_vectors(doc_id)
            posts = self.doc_texts(doc_id)
            if st.status is IndexingStatus.COMPLETED:
                if segs != vecs:
                    out.append(
                        f"{doc_id}: {len(segs - vecs)} missing / {len(vecs - segs)} orphan vectors"
                    )
                if posts != segs:
                    out.append(
                        f"{doc_id}: {len(segs - posts)} missing / {len(posts - segs)} orphan texts"
                    )
                if not all(all(self.flags[n]) for n in segs):
                    out.append(f"{doc_id}: completed with unflagged segments")
                if st.segment_count != len(self.doc_segments(doc_id)):
                    out.append(f"{doc_id}: segment_count {st.segment_count} != {len(segs)} rows")
            elif vecs - segs or posts - segs:
                out.append(f"{doc_id}: {st.status.value} with orphans")
            if st.status is IndexingStatus.DELETED and (segs or vecs or posts):
                out.append(f"{doc_id}: deleted but {len(segs)}/{len(vecs)}/{len(posts)} remain")
        dups = [n for n, (_, copies) in self.vectors.items() if copies > 1]
        if dups:
            out.append(f"{len(dups)} duplicated vectors")
        strays = [n for n, (d, _) in self.vectors.items() if n not in self.segments]
        if strays:
            out.append(f"{len(strays)} vectors without a segment row")
        stray_posts = [n for n in self.texts if n not in self.segments]
        if stray_posts:
            out.append(f"{len(stray_posts)} keyword entities without a segment row")
        return out

    def settled(self, ids: Iterable[str]) -> bool:
        return not self.problems(ids)

    def summary(self, ids: Iterable[str]) -> str:
        from collections import Counter

        wanted = set(ids)
        by_status = Counter(
            (self.docs[d].status.value if d in self.docs else "missing") for d in wanted
        )
        probs = self.problems(wanted)
        return f"{dict(by_status)}; {len(probs)} problem(s): {probs[:15]}"


def count_rows(c: Container, what: str, tenant: str, dataset: str) -> int:
    """Progress counters per stage, read straight from the database."""
    from infra.db.models import DocumentRow, EmbeddingRow, SegmentRow

    s = SegmentRow.__table__
    d = DocumentRow.__table__
    e = EmbeddingRow.__table__
    if what == "split":
        q = (
            select(func.count())
            .select_from(s)
            .where(s.c.tenant_id == tenant, s.c.dataset_id == dataset)
        )
    elif what == "embed":
        q = select(func.count()).select_from(e)
    elif what == "load_vectors":
        q = (
            select(func.count())
            .select_from(s)
            .where(s.c.tenant_id == tenant, s.c.dataset_id == dataset, s.c.vector_indexed.is_(True))
        )
    elif what == "index_keywords":
        q = (
            select(func.count())
            .select_from(s)
            .where(
                s.c.tenant_id == tenant, s.c.dataset_id == dataset, s.c.keywords_indexed.is_(True)
            )
        )
    elif what == "parse":
        q = (
            select(func.count())
            .select_from(d)
            .where(d.c.tenant_id == tenant, d.c.dataset_id == dataset, d.c.status != "parsing")
        )
    elif what == "track_status":
        q = (
            select(func.count())
            .select_from(d)
            .where(d.c.tenant_id == tenant, d.c.dataset_id == dataset, d.c.status == "completed")
        )
    else:
        raise ValueError(what)
    with c.database.connect() as conn:
        return int(conn.execute(q).scalar_one())
