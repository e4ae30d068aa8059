"""Pods come and go: every stage is scaled 1 -> 3 -> 1 `kbstream worker`
processes while a corpus is indexed, and members are SIGKILLed while their
group rebalances (right after another member left), or right after others
joined and took partitions.
PostgreSQL, a milvus-lite server, the session's tansu broker and the real
model, as in production with a deployment controller scaling pods.

The end state must be exact: every document completed with exactly its
segments, one vector and one keyword entity per segment, `verify` clean, no dead
letters, every distinct text once in the embedding cache. Texts embedded twice
(two members briefly working the same partition during a rebalance) are
wasted model calls, not wrong state; their number is printed (run with -s).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from domain.documents import IndexingStatus
from domain.events import DocForm, DocumentCreated, ProcessRule
from domain.segments import build_segments
from domain.splitting import split_document
from infra.extract import extract_text
from kbstream.dlq import list_dead_letters
from kbstream.verify import verify
from tests.e2e.procs import PIPELINE, Cluster, Worker, fresh_database, retrying, wait_until
from tests.e2e.test_faults import WORDS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

DATASET = "churn"
DOCUMENTS = 320
WAVES = 16
# SIGKILL the oldest member once new ones hold partitions ...
KILL_ON_JOIN = ("split", "embed", "load_vectors")
# ... or a member right after another one left the group
KILL_ON_LEAVE = ("parse", "index_keywords", "track_status")

# the first 22 of the fault suite's vocabulary
NOUNS = WORDS[:22]


def body(rng: random.Random, i: int) -> str:
    """A few hundred characters, one segment, a text no other document has."""
    return " ".join(
        f"Churn note {i}.{s} saw the {rng.choice(NOUNS)} near the {rng.choice(NOUNS)} "
        f"on day {rng.randint(1, 99999)}."
        for s in range(5)
    )


@pytest.fixture
def cluster(tmp_path: Path, tansu: str) -> Iterator[Cluster]:
    with fresh_database() as (url, name):
        c = Cluster(tmp_path, tansu, url, db_name=name)
        try:
            yield c
        finally:
            c.close()


def expected_segments(c: Cluster, path: Path, doc_id: str) -> set[str]:
    tc = c.container.token_counter
    text = extract_text(path.read_bytes(), path.name).text
    chunks = split_document(text, DocForm.TEXT, ProcessRule(), tc, tc.max_input_tokens)
    return {s.index_node_id for s in build_segments(DATASET, doc_id, chunks)}


def working(workers: list[Worker]) -> list[Worker]:
    return [w for w in workers if "split: doc-" in w.log_text()]


def stopped(w: Worker) -> bool:
    """It closed its consumer: the group is rebalancing without it."""
    return f"stage {w.stage} stopped" in w.log_text() or not w.alive


def assignments(w: Worker) -> int:
    """How many assignments the worker has logged (each rebalance logs one)."""
    return w.log_text().count(f"stage {w.stage} assigned [")


def reassigned(w: Worker, seen: int) -> bool:
    return assignments(w) > seen


def test_pods_scaled_up_and_down_and_killed_mid_rebalance_lose_and_duplicate_nothing(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    c = cluster
    rng = random.Random(20240610)
    began = time.monotonic()
    c.start_all(PIPELINE)

    ids = [f"doc-{i:03d}" for i in range(DOCUMENTS)]
    expected: dict[str, set[str]] = {}
    events = []
    for i, doc_id in enumerate(ids):
        path = c.corpus / f"{doc_id}.txt"
        path.write_text(body(rng, i))
        expected[doc_id] = expected_segments(c, path, doc_id)
        events.append(
            DocumentCreated(
                dataset_id=DATASET, document_id=doc_id, source=path.name, uri=path.as_uri()
            )
        )
    waves = [events[k::WAVES] for k in range(WAVES)]
    in_flight: list[int] = []  # unfinished documents at each kill

    def feed(n: int = 1) -> None:
        for _ in range(n):
            if waves:
                c.publish(*waves.pop(0))

    def unfinished() -> int:
        snap = c.snapshot(DATASET)
        done = sum(1 for d in snap.docs.values() if d.status.finished)
        return DOCUMENTS - done

    def kill(w: Worker) -> None:
        c.kill(w)
        in_flight.append(unfinished())

    feed(3)
    # -- scale up: 1 -> 3 members per stage ------------------------------------------
    for stage in PIPELINE:
        c.start(stage)
        c.start(stage)
        feed()
    for stage in KILL_ON_JOIN:
        original, *joining = c.live(stage)
        # Killed once the joiners hold partitions, not the instant they
        # subscribe: the embedded tansu broker (0.6.0) can wedge a group whose
        # member is SIGKILLed during a join (no member, old or new, is ever
        # assigned the orphaned partitions again). Apache Kafka does not; the
        # kills right after a member left (below) stay mid-rebalance.
        c.wait_assigned(joining)
        kill(original)
        c.restart(stage)  # the controller replaces the dead pod
        feed()
    c.wait_assigned([w for s in PIPELINE for w in c.live(s)])
    assert c.alive() == {s: 3 for s in PIPELINE}, c.alive()
    # hold three members per stage until work flows through each of them (split
    # logs every document it splits)
    feed(3)
    assert wait_until(lambda: len(working(c.live("split"))) == 3, 120), c.worker_logs(1500)
    scaled_up = time.monotonic()

    # -- scale down: 3 -> 1 -----------------------------------------------------------
    leaving: list[Worker] = []
    for stage in PIPELINE:
        first, second, _ = c.live(stage)
        first.terminate()
        leaving.append(first)
        if stage in KILL_ON_LEAVE:
            assert wait_until(partial(stopped, first), 60, 0.05), first.log_text()[-2000:]
            kill(second)
        else:
            # one pod at a time, as a rolling scale-down does: the embedded tansu
            # broker (0.6.0) can wedge a group when two members leave at once
            # (the survivor is never given the orphaned partitions)
            survivor = c.live(stage)[-1]
            seen = assignments(survivor)
            assert wait_until(partial(stopped, first), 60, 0.05), first.log_text()[-2000:]
            rebalanced = partial(reassigned, survivor, seen)
            assert wait_until(rebalanced, 60, 0.05), survivor.log_text()[-2000:]
            second.terminate()
            leaving.append(second)
        feed()
    for w in leaving:
        # a graceful stop commits, leaves the group and exits cleanly
        assert w.proc.wait(60) == 0, w.log_text()[-3000:]
    feed(len(waves))
    assert not waves
    churned = time.monotonic()

    snap = c.wait_settled(
        DATASET,
        ids,
        timeout=300,
        expected=lambda s: all(s.status(d) is IndexingStatus.COMPLETED for d in ids),
    )
    assert c.alive() == {s: 1 for s in PIPELINE}, c.alive()
    assert snap.problems() == []
    for doc_id in ids:
        assert snap.status(doc_id) is IndexingStatus.COMPLETED, snap.docs[doc_id]
        assert snap.doc_segments(doc_id) == expected[doc_id], doc_id
        assert snap.doc_vectors(doc_id) == expected[doc_id], doc_id
        assert snap.doc_texts(doc_id) == expected[doc_id], doc_id
    assert all(copies == 1 for _, copies in snap.vectors.values())

    report = retrying(lambda: verify(c.container, DATASET))
    assert report.drift == [], report.to_dict()
    assert report.segments == report.vectors == sum(len(v) for v in expected.values())
    assert list_dead_letters(c.bootstrap, c.topics) == []

    # every distinct text is in the cache once; texts embedded more than once
    # were embedded by two members at the same time, each counting it
    provider, model, _ = c.container.model_identity
    distinct = set(snap.seg_hash.values())
    with c.container.uow(readonly=True) as uow:
        assert uow.embeddings.count(provider, model) == len(distinct)
        assert distinct <= set(
            uow.embeddings.get_many(c.container.settings.tenant, provider, model, distinct)
        )
    embedded = sum(d.embedded_texts for d in snap.docs.values())
    assert embedded >= len(distinct)
    duplicates = embedded - len(distinct)

    started = sum(len(ws) for ws in c.workers.values())
    splitters = len(working(c.workers["split"]))
    with capsys.disabled():
        print(
            f"\n[pod churn] documents={DOCUMENTS}, segments={len(snap.segments)}, "
            f"worker processes started={started} (split ones that split documents: {splitters}), SIGKILLs={c.kills} (unfinished documents "
            f"at each: {in_flight}), graceful stops={len(leaving)}; scale-up done "
            f"{scaled_up - began:.0f}s, scale-down done {churned - began:.0f}s, settled "
            f"{time.monotonic() - began:.0f}s; texts embedded={embedded}, distinct="
            f"{len(distinct)}, duplicate embeddings from rebalances={duplicates}"
        )
