"""Crash-exact at every commit/publish boundary: for each stage, SIGKILL its
worker process right after the stage committed (nothing published), right
after the publish (offsets not committed), and for parse between its claim
and result transactions; restart it; the end state must be exact.

One pipeline for the module (tests/e2e/procs.py: a `kbstream worker` process
per stage, PostgreSQL, a milvus-lite server, the real model), one dataset
per case. Every worker runs with every fail point enabled and disarmed: a
point fires only while its marker file is absent (consumers/failpoints.py),
so a case arms its point by deleting the marker, and the point disarms itself
when it fires. Only the killed worker restarts; the rest keep running.

The workload of a case: four documents indexed beforehand (all cases' at
once), then an update that removes segments, a delete, a segment delete and a
create, published in that order to single-partition topics, so the first
batch the armed stage handles holds the update.

Then a segment.deleted by segment_id (it names no index_node_id) with split
SIGKILLed after its commit: the redelivery re-sends the removal it owes.

Issue 19's new boundaries, two cases: a segment.updated with split
SIGKILLed after its commit (the redelivery no longer finds the segment by its
old id and sends the rewritten segment and the owed removal again), and a
document.disabled with parse SIGKILLed after its commit (the redelivery
switches nothing new and sends the reconcile again), then enabled again.

Last, the durable delivery counter: a split worker SIGKILLed by the same
event every time it handles it is restarted until the event is dead-lettered
instead, its document ends in `error`, and the worker moves on.
"""

from __future__ import annotations

import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from consumers.pipeline import STAGES
from domain.documents import IndexingStatus
from domain.events import (
    DocumentDeleted,
    DocumentDisabled,
    DocumentEnabled,
    DocumentUpdated,
    Event,
    SegmentDeleted,
    SegmentUpdated,
)
from domain.segments import compute_doc_hash, make_index_node_id
from infra.db.models import SegmentRow
from infra.kafka import headers as h
from kbstream.dlq import DeadLetter, list_dead_letters
from kbstream.verify import verify
from tests.e2e.procs import (
    REPO,
    Cluster,
    DatasetSnapshot,
    Worker,
    fresh_database,
    retrying,
    wait_exit,
    wait_quiet,
    wait_until,
)
from tests.e2e.test_faults import Doc, assert_exact, expected_segments, sentence, write_doc

pytestmark = pytest.mark.e2e

BOUNDARIES = ("after_handle", "after_publish")
POINTS = ("parse.after_claim", *(f"{s}.{b}" for s in STAGES for b in BOUNDARIES))
CRASHER_STAGE = "split"  # the delivery counter's case
BY_SEGMENT_ID = "split.after_handle, segment.deleted by segment_id"
SEGMENT_UPDATED = "split.after_handle, segment.updated"
DISABLED = "parse.after_handle, document.disabled"
EDITED = "an edited segment's new text, 7 words"
MAX_DELIVERIES = 2


def paragraph(rng: random.Random, tag: str, sentences: int) -> str:
    return " ".join(sentence(rng, 4, s) for s in range(sentences)) + f" ({tag})"


@dataclass
class Case:
    """One dataset: what is indexed first, what the armed crash interrupts,
    and the exact end state."""

    dataset: str
    docs: dict[str, Doc]  # document_id -> the version indexed first
    final: dict[str, Doc] = field(default_factory=dict)  # live documents' last version
    changes: list[Event] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)  # segments the changes remove
    expected: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return sorted({*self.docs, *self.final})


def make_case(c: Cluster, dataset: str, rng: random.Random) -> Case:
    def doc(name: str, *paragraphs: str, version: int = 1) -> Doc:
        return write_doc(c.corpus, f"{dataset}-{name}", "\n\n".join(paragraphs), version)

    p = [paragraph(rng, f"{dataset} {i}", 7) for i in range(5)]
    short = [paragraph(rng, f"{dataset} short {i}", 2) for i in range(3)]
    a, b, cc, d = doc("a", *p[:3]), doc("b", short[0]), doc("c", p[3], p[4]), doc("d", short[2])
    case = Case(dataset, {x.document_id: x for x in (a, b, cc, d)})
    first = {x.document_id: expected_segments(c, dataset, x) for x in case.docs.values()}
    # A keeps its first paragraph, loses two, gains one; B goes; C loses a segment; E is new
    a2 = doc("a", p[0], paragraph(rng, f"{dataset} new", 7), version=2)
    e = doc("e", paragraph(rng, f"{dataset} e", 2))
    c_gone = list(first[cc.document_id])[-1]
    case.changes = [
        a2.event(dataset, DocumentUpdated),
        DocumentDeleted(dataset_id=dataset, document_id=b.document_id),
        SegmentDeleted(dataset_id=dataset, document_id=cc.document_id, index_node_id=c_gone),
        e.event(dataset),
    ]
    case.final = {x.document_id: x for x in (a2, cc, d, e)}
    case.deleted = {b.document_id}
    case.expected = {i: expected_segments(c, dataset, x) for i, x in case.final.items()}
    case.expected[cc.document_id].pop(c_gone)
    case.removed = {n for segs in first.values() for n in segs} - {
        n for segs in case.expected.values() for n in segs
    }
    kept_a = set(first[a.document_id]) & set(case.expected[a.document_id])
    assert kept_a and set(first[a.document_id]) - kept_a, "A's update must keep and remove"
    assert len(first[cc.document_id]) >= 2, "C needs a segment to spare"
    return case


def indexed(case: Case) -> Callable[[DatasetSnapshot], bool]:
    return lambda s: all(s.status(d) is IndexingStatus.COMPLETED for d in case.docs)


@dataclass
class Bench:
    cluster: Cluster
    markers: Path
    cases: dict[str, Case]
    texts: set[str]  # every text the workload ever indexes

    @property
    def env(self) -> dict[str, str]:
        return {
            "KBSTREAM_FAILPOINTS": ",".join(POINTS),
            "KBSTREAM_FAILPOINT_MARKER_DIR": str(self.markers),
        }

    def worker(self, stage: str) -> Worker:
        (w,) = self.cluster.live(stage)
        return w

    def start(self, stage: str, may_die: bool = False, **env: str) -> Worker:
        w = self.cluster.start(stage, **{**self.env, **env})
        if may_die:  # armed to die, it may do so as soon as it has joined
            assert wait_until(lambda: w.assigned() or not w.alive, 180), w.log_text()[-3000:]
        else:
            self.cluster.wait_assigned([w])
        return w

    def arm(self, point: str) -> None:
        (self.markers / point).unlink()

    def disarm_all(self) -> None:
        for p in POINTS:
            (self.markers / p).touch()


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory, tansu: str) -> Iterator[Bench]:
    root = tmp_path_factory.mktemp("failpoints")
    markers = root / "markers"
    markers.mkdir()
    rng = random.Random(4242)
    with fresh_database() as (url, name):
        # one partition: the armed stage's first batch is the case's first change
        c = Cluster(root, tansu, url, db_name=name, partitions=1, session_timeout_ms=3000)
        try:
            cases = {p: make_case(c, f"fp{i:02d}", rng) for i, p in enumerate(POINTS)}
            cases["crasher"] = make_case(c, "crash", rng)
            cases[BY_SEGMENT_ID] = make_case(c, "fpseg", rng)
            cases[SEGMENT_UPDATED] = make_case(c, "fpedit", rng)
            cases[DISABLED] = make_case(c, "fpoff", rng)
            texts = {
                t
                for case in cases.values()
                for x in (*case.docs.values(), *case.final.values())
                for t in expected_segments(c, case.dataset, x).values()
            } | {EDITED}
            b = Bench(c, markers, cases, texts)
            b.disarm_all()
            started = time.monotonic()
            for stage in STAGES:
                c.start(stage, **b.env)
            c.wait_assigned([w for ws in c.workers.values() for w in ws])
            assigned = time.monotonic()
            for case in cases.values():
                c.publish(*(x.event(case.dataset) for x in case.docs.values()))
            for case in cases.values():
                c.wait_settled(case.dataset, case.docs, 240, indexed(case))
            print(
                f"\n[failpoints] workers up in {assigned - started:.0f}s, "
                f"{len(cases) * 4} documents indexed in {time.monotonic() - assigned:.0f}s"
            )
            yield b
        finally:
            c.close()


def dead_letters(c: Cluster, dataset: str) -> list[DeadLetter]:
    return [
        x
        for x in list_dead_letters(c.bootstrap, c.topics)
        if f'"dataset_id":"{dataset}"' in (x.value or b"").decode(errors="replace")
    ]


def parse_has(point: str) -> bool:
    source = (REPO / "consumers" / "parse.py").read_text()
    return re.search(rf"failpoint\(\s*[\"']{re.escape(point)}[\"']", source) is not None


def check_exact(b: Bench, case: Case) -> None:
    c = b.cluster
    snap = c.wait_settled(
        case.dataset,
        case.ids,
        180,
        lambda s: (
            all(s.doc_segments(d) == set(segs) for d, segs in case.expected.items())
            and all(s.status(d) is IndexingStatus.DELETED for d in case.deleted)
        ),
    )
    # per document: segments == vectors == keyword entities,
    # nothing of removed segments or deleted documents, nothing in flight
    assert_exact(snap, case.expected, case.deleted)
    assert not case.removed & (set(snap.segments) | set(snap.vectors) | set(snap.texts))
    report = retrying(lambda: verify(c.container, case.dataset))
    assert report.drift == [], report.to_dict()
    assert report.segments == report.vectors == sum(map(len, case.expected.values()))
    provider, model, _ = c.container.model_identity
    with c.container.uow(readonly=True) as uow:
        final = set(snap.seg_hash.values())
        assert final <= set(
            uow.embeddings.get_many(c.container.settings.tenant, provider, model, final)
        )
        # each text embedded once, nothing but the workload's texts
        assert uow.embeddings.count(provider, model) <= len(b.texts)


@pytest.mark.parametrize("point", POINTS)
def test_a_sigkill_at_the_boundary_leaves_the_exact_state(bench: Bench, point: str) -> None:
    stage = point.split(".")[0]
    if point == "parse.after_claim":
        assert parse_has(point), "consumers/parse.py lost its failpoint('parse.after_claim')"
    c, case = bench.cluster, bench.cases[point]
    wait_quiet(c)  # stragglers of the previous case must not trip the point
    victim = bench.worker(stage)
    bench.arm(point)
    c.publish(*case.changes)
    rc = wait_exit(victim, 120)
    assert rc == -signal.SIGKILL, f"{point} did not fire (rc={rc}):\n{victim.log_text()[-3000:]}"
    assert f"failpoint {point}: SIGKILL" in victim.log_text()
    assert (bench.markers / point).exists()  # fired once; disarmed again
    bench.start(stage)
    check_exact(bench, case)
    assert dead_letters(c, case.dataset) == []


def test_a_sigkill_after_split_deleted_a_segment_by_segment_id(bench: Bench) -> None:
    """Issue 20, item 4: split commits a segment.deleted that names only the
    segment's row id and dies before publishing the removal. The redelivered
    event finds no row; the removal owed since the commit is sent again, so
    no orphan vector or keyword entity remains and the document completes
    with the right count."""
    c, case = bench.cluster, bench.cases[BY_SEGMENT_ID]
    (by_node,) = [e for e in case.changes if isinstance(e, SegmentDeleted)]
    doc_id, gone = by_node.document_id, by_node.index_node_id
    assert gone is not None
    s = SegmentRow.__table__
    with c.container.database.connect() as conn:
        row_id = conn.execute(select(s.c.id).where(s.c.index_node_id == gone)).scalar_one()
    by_id = SegmentDeleted(dataset_id=case.dataset, document_id=doc_id, segment_id=row_id)
    # the only change: the armed split's first batch is this delete
    case.changes, case.deleted, case.final = [by_id], set(), dict(case.docs)
    case.expected = {i: expected_segments(c, case.dataset, x) for i, x in case.docs.items()}
    case.expected[doc_id].pop(gone)
    case.removed = {gone}

    wait_quiet(c)
    victim = bench.worker("split")
    bench.arm("split.after_handle")
    c.publish(by_id)
    rc = wait_exit(victim, 120)
    assert rc == -signal.SIGKILL, f"did not fire (rc={rc}):\n{victim.log_text()[-3000:]}"
    bench.start("split")
    check_exact(bench, case)
    doc = c.snapshot(case.dataset).docs[doc_id]
    assert (doc.status, doc.segment_count) == (
        IndexingStatus.COMPLETED,
        len(case.expected[doc_id]),
    )
    assert dead_letters(c, case.dataset) == []


def test_a_sigkill_after_split_rewrote_an_edited_segment(bench: Bench) -> None:
    """Issue 19: split commits a segment.updated (the row has its new text and
    id, the old id is owed to the indexes) and dies before publishing. The
    redelivered event no longer finds the segment by its old id; split sends
    the owed removal and the unindexed new segment again. Only the new text
    is embedded; the indexes end exact."""
    c, case = bench.cluster, bench.cases[SEGMENT_UPDATED]
    (by_node,) = [e for e in case.changes if isinstance(e, SegmentDeleted)]
    doc_id, old = by_node.document_id, by_node.index_node_id
    assert old is not None
    edit = SegmentUpdated(
        dataset_id=case.dataset, document_id=doc_id, index_node_id=old, content=EDITED
    )
    new = make_index_node_id(case.dataset, doc_id, compute_doc_hash(EDITED))
    case.changes, case.deleted, case.final = [edit], set(), dict(case.docs)
    case.expected = {i: expected_segments(c, case.dataset, x) for i, x in case.docs.items()}
    case.expected[doc_id].pop(old)
    case.expected[doc_id][new] = EDITED
    case.removed = {old}

    wait_quiet(c)
    victim = bench.worker("split")
    bench.arm("split.after_handle")
    c.publish(edit)
    rc = wait_exit(victim, 120)
    assert rc == -signal.SIGKILL, f"did not fire (rc={rc}):\n{victim.log_text()[-3000:]}"
    bench.start("split")
    check_exact(bench, case)
    assert dead_letters(c, case.dataset) == []


def test_a_sigkill_after_parse_disabled_a_document(bench: Bench) -> None:
    """Issue 19: parse commits a document.disabled and dies before publishing.
    The redelivery finds the document disabled already and sends the
    reconcile again: its segments stay, both indexes drop them, verify is
    clean. Enabled again, it is exact."""
    c, case = bench.cluster, bench.cases[DISABLED]
    off = sorted(case.docs)[0]
    case.changes, case.deleted, case.final = [], set(), dict(case.docs)
    case.expected = {i: expected_segments(c, case.dataset, x) for i, x in case.docs.items()}
    case.removed = set()

    wait_quiet(c)
    victim = bench.worker("parse")
    bench.arm("parse.after_handle")
    c.publish(DocumentDisabled(dataset_id=case.dataset, document_id=off))
    rc = wait_exit(victim, 120)
    assert rc == -signal.SIGKILL, f"did not fire (rc={rc}):\n{victim.log_text()[-3000:]}"
    bench.start("parse")
    snap = c.wait_settled(
        case.dataset,
        case.ids,
        180,
        lambda s: (
            s.status(off) is IndexingStatus.COMPLETED and not s.doc_vectors(off) | s.doc_texts(off)
        ),
    )
    assert snap.doc_segments(off) == set(case.expected[off])  # the rows stay
    assert not snap.docs[off].enabled
    report = retrying(lambda: verify(c.container, case.dataset))
    assert report.drift == [], report.to_dict()
    c.publish(DocumentEnabled(dataset_id=case.dataset, document_id=off))
    back = set(case.expected[off])
    c.wait_settled(
        case.dataset, case.ids, 180, lambda s: s.docs[off].enabled and s.doc_vectors(off) == back
    )
    check_exact(bench, case)
    assert dead_letters(c, case.dataset) == []


def test_an_event_that_kills_its_worker_every_time_is_dead_lettered(bench: Bench) -> None:
    """Twice SIGKILLed by the same event, the third worker dead-letters it
    without handling it, records the failure on its document, and goes on."""
    c, case = bench.cluster, bench.cases["crasher"]
    stage = CRASHER_STAGE
    wait_quiet(c)
    bench.worker(stage).stop()
    deadly = {"KBSTREAM_FAILPOINTS_ALWAYS": f"{stage}.before_handle"}
    limit = {"KBSTREAM_MAX_DELIVERIES": str(MAX_DELIVERIES)}
    update, *rest = case.changes
    victim = bench.start(stage, may_die=True, **deadly, **limit)
    c.publish(update)
    for death in range(1, MAX_DELIVERIES + 1):
        rc = wait_exit(victim, 120)
        assert rc == -signal.SIGKILL, f"death {death}: rc={rc}\n{victim.log_text()[-3000:]}"
        deadly_again = death < MAX_DELIVERIES
        victim = bench.start(
            stage, may_die=deadly_again, **(deadly if deadly_again else {}), **limit
        )
    a = update.document_id
    assert wait_until(lambda: c.snapshot(case.dataset).status(a) is IndexingStatus.ERROR, 60), (
        victim.log_text()[-3000:]
    )
    doc = c.snapshot(case.dataset).docs[a]
    assert f"delivered {MAX_DELIVERIES} times without completing" in (doc.error or "")
    (letter,) = dead_letters(c, case.dataset)
    assert letter.headers[h.STAGE] == stage
    assert letter.headers[h.ERROR_CLASS] == "RepeatedCrash"
    assert letter.headers[h.ATTEMPTS] == str(MAX_DELIVERIES)
    # the worker goes on: the rest of the workload completes exactly; A keeps
    # its first version's segments (the update never split), flagged error
    assert victim.alive
    c.publish(*rest)
    case.expected[a] = expected_segments(c, case.dataset, case.docs[a])
    snap = c.wait_settled(
        case.dataset,
        [d for d in case.ids if d != a],
        180,
        lambda s: (
            all(s.doc_segments(d) == set(segs) for d, segs in case.expected.items() if d != a)
            and all(s.status(d) is IndexingStatus.DELETED for d in case.deleted)
        ),
    )
    assert snap.status(a) is IndexingStatus.ERROR
    assert snap.doc_segments(a) == snap.doc_vectors(a) == set(case.expected[a])
    rc, report = c.verify(case.dataset)  # the CLI, once
    assert rc == 0 and report["clean"], report
