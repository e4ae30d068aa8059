"""Never lose, never duplicate, never crash: fault injection against the real
thing. Every stage runs as its own `kbstream worker` process (what a pod
runs) on the session's tansu broker, a PostgreSQL database of the test's own,
a milvus-lite server and the real all-MiniLM-L6-v2 model; the test kills
workers, duplicates and reorders events, cuts the database off, feeds every
topic poison, and tampers with the indexes behind the pipeline's back. The
final state must be exact and `kbstream verify` clean.

Numbers worth quoting are printed (run with -s to see them)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from sqlalchemy import create_engine, text

from domain.documents import DocKey, IndexingStatus
from domain.events import (
    DocForm,
    DocumentCreated,
    DocumentDeleted,
    DocumentUpdated,
    ProcessRule,
)
from domain.segments import build_segments
from domain.splitting import split_document
from infra.extract import extract_text
from kbstream.dlq import list_dead_letters
from tests.e2e.procs import (
    PG_ADMIN_URL,
    PIPELINE,
    Cluster,
    DatasetSnapshot,
    count_rows,
    fresh_database,
    retrying,
    terminate_connections,
    wait_until,
)
from tests.harness import RUNTIMES

pytestmark = pytest.mark.e2e

WORDS = [
    "harbour",
    "lighthouse",
    "glacier",
    "orchard",
    "violin",
    "compass",
    "lantern",
    "meadow",
    "falcon",
    "quarry",
    "saffron",
    "tundra",
    "beacon",
    "canyon",
    "ember",
    "fjord",
    "garnet",
    "hollow",
    "island",
    "juniper",
    "kelp",
    "lagoon",
    "marble",
    "nectar",
    "oasis",
    "pebble",
    "quartz",
    "reef",
    "summit",
    "thistle",
    "umber",
    "valley",
    "willow",
    "yarrow",
    "zephyr",
    "anchor",
    "bramble",
    "cedar",
    "delta",
    "estuary",
    "fern",
    "grove",
    "heath",
    "inlet",
    "jetty",
    "knoll",
    "ledge",
    "marsh",
    "nook",
    "outcrop",
    "prairie",
    "ridge",
    "spire",
    "timber",
]


def sentence(rng: random.Random, n: int, i: int) -> str:
    picked = rng.sample(WORDS, n)
    return (
        f"Note {i} records the {' and the '.join(picked)} observed on day {rng.randint(1, 9999)}."
    )


def long_text(rng: random.Random, i: int, paragraphs: int = 3) -> str:
    """A few paragraphs of ~150 tokens each: several segments per document."""
    return "\n\n".join(
        " ".join(sentence(rng, 5, i * 100 + p * 10 + s) for s in range(7))
        for p in range(paragraphs)
    )


@dataclass
class Doc:
    document_id: str
    path: Path
    text: str

    def event(self, dataset: str, kind: type = DocumentCreated) -> DocumentCreated:
        return kind(
            dataset_id=dataset,
            document_id=self.document_id,
            source=str(self.path),
            uri=self.path.as_uri(),
        )


def write_doc(root: Path, document_id: str, body: str, version: int = 1) -> Doc:
    path = root / f"{document_id}.v{version}.txt"
    path.write_text(body)
    return Doc(document_id, path, body)


def expected_segments(cluster: Cluster, dataset: str, doc: Doc) -> dict[str, str]:
    """index_node_id -> content the pipeline must end with for this document,
    computed in-process with the same domain code."""
    tc = cluster.container.token_counter
    text_ = extract_text(doc.path.read_bytes(), doc.path.name).text
    chunks = split_document(text_, DocForm.TEXT, ProcessRule(), tc, tc.max_input_tokens)
    return {s.index_node_id: s.content for s in build_segments(dataset, doc.document_id, chunks)}


@pytest.fixture(params=RUNTIMES)
def cluster_factory(request: pytest.FixtureRequest, tmp_path: Path, tansu: str) -> Iterator[object]:
    """Clusters whose workers run under each runtime in turn (the test runs twice)."""
    clusters: list[Cluster] = []
    stack = []

    def make(**settings: object) -> Cluster:
        db = fresh_database()
        url, name = db.__enter__()
        stack.append(db)
        settings = {"runtime": request.param, **settings}
        c = Cluster(tmp_path / f"c{len(clusters)}", tansu, url, db_name=name, **settings)
        clusters.append(c)
        return c

    try:
        yield make
    finally:
        for c in clusters:
            c.close()
        for db in reversed(stack):
            db.__exit__(None, None, None)


def assert_exact(
    snap: DatasetSnapshot, expected: dict[str, dict[str, str]], deleted: set[str]
) -> None:
    """Every live document holds exactly its expected segments, vectors and
    keyword entities; deleted ones hold nothing; nothing else exists."""
    problems = snap.problems()
    assert not problems, problems[:20]
    for doc_id, segs in expected.items():
        assert snap.status(doc_id) is IndexingStatus.COMPLETED, (doc_id, snap.docs.get(doc_id))
        want = set(segs)
        assert snap.doc_segments(doc_id) == want, doc_id
        assert snap.doc_vectors(doc_id) == want, doc_id
        assert snap.doc_texts(doc_id) == want, doc_id
    for doc_id in deleted:
        assert snap.status(doc_id) is IndexingStatus.DELETED, (doc_id, snap.docs.get(doc_id))
        assert not snap.doc_segments(doc_id) | snap.doc_vectors(doc_id) | snap.doc_texts(doc_id)
    every = {n for segs in expected.values() for n in segs}
    assert set(snap.segments) == every
    assert set(snap.vectors) == every
    assert set(snap.texts) == every
    assert all(copies == 1 for _, copies in snap.vectors.values())


# --- (1) SIGKILL workers in rotation while a corpus is indexed -------------------------

KILL_ROTATION = ("split", "embed", "load_vectors", "index_keywords", "parse", "track_status")
MIN_KILLS = 24
SCALED = ("embed", "load_vectors")  # two workers each: a kill also moves partitions


def test_sigkilled_workers_lose_and_duplicate_nothing(cluster_factory, capsys) -> None:
    rng = random.Random(20240601)
    c: Cluster = cluster_factory()
    dataset = "kills"
    started = time.monotonic()
    c.start_all((*KILL_ROTATION, *SCALED))

    # 200 short documents (one or two sentences), every 10th a long one
    docs: dict[str, Doc] = {}
    for i in range(200):
        body = (
            long_text(rng, i)
            if i % 10 == 0
            else " ".join(sentence(rng, 3, i * 10 + s) for s in range(1 + i % 2))
        )
        docs[f"doc-{i:03d}"] = write_doc(c.corpus, f"doc-{i:03d}", body)
    ids = sorted(docs)
    # 20 updates: 10 long documents keep 2 of 3 paragraphs (kept, removed and
    # added segments), 10 short ones change
    updated = ids[0::20] + ids[5::20]
    deleted = set(ids[7::20])  # 10 deletes
    waves: list[list[object]] = [
        [docs[d].event(dataset) for d in ids[k : k + 10]] for k in range(0, 200, 10)
    ]
    later: list[object] = []
    for d in updated:
        old = docs[d].text
        body = old + " An amendment follows." if "\n\n" not in old else old.rsplit("\n\n", 1)[0]
        docs[d] = write_doc(c.corpus, d, body + f"\n\nRevision of {d}: {sentence(rng, 4, 7)}", 2)
        later.append(docs[d].event(dataset, DocumentUpdated))
    later += [DocumentDeleted(dataset_id=dataset, document_id=d) for d in sorted(deleted)]
    rng.shuffle(later)
    waves += [later[k : k + 10] for k in range(0, len(later), 10)]

    expected = {d: expected_segments(c, dataset, docs[d]) for d in ids if d not in deleted}
    texts = {t for segs in expected.values() for t in segs.values()}

    # kill the next stage of the rotation once it has made progress since it
    # (re)started, 0.5-2 s into its work; restart it at once; keep publishing
    baseline = {s: count_rows(c.container, s, c.tenant, dataset) for s in KILL_ROTATION}
    kill_log: list[str] = []
    wave = 0
    turn = 0
    while wave < len(waves) or c.kills < MIN_KILLS:
        if wave < len(waves):
            c.publish(*waves[wave])  # type: ignore[arg-type]
            wave += 1
        stage = KILL_ROTATION[turn % len(KILL_ROTATION)]
        turn += 1
        w = rng.choice(c.live(stage))
        wait_until(
            lambda s=stage, w=w: (
                w.assigned() and count_rows(c.container, s, c.tenant, dataset) > baseline[s]
            ),
            timeout=15,
            interval=0.2,
        )
        time.sleep(rng.uniform(0.5, 2.0))
        c.kill(w)
        baseline[stage] = count_rows(c.container, stage, c.tenant, dataset)
        kill_log.append(f"{time.monotonic() - started:.0f}s {stage}")
        c.restart(stage)
        if time.monotonic() - started > 300 and wave >= len(waves) and c.kills >= 20:
            break  # a very slow machine: enough kills, let it settle
    killing_done = time.monotonic()

    snap = c.wait_settled(
        dataset,
        ids,
        timeout=240,
        expected=lambda s: (
            all(s.status(d) is IndexingStatus.DELETED for d in deleted)
            and all(s.status(d) is IndexingStatus.COMPLETED for d in expected)
        ),
    )
    assert_exact(snap, expected, deleted)
    assert c.alive() == {s: 1 + (s in SCALED) for s in KILL_ROTATION}, c.alive()

    # the embedding cache: every final text is cached, each once
    provider, model, _ = c.container.model_identity
    final_hashes = set(snap.seg_hash.values())
    with c.container.uow(readonly=True) as uow:
        cached = uow.embeddings.count(provider, model)
        assert final_hashes <= set(
            uow.embeddings.get_many(c.container.settings.tenant, provider, model, final_hashes)
        )
    assert cached >= len(texts)

    rc, report = c.verify(dataset)
    assert rc == 0 and report["clean"], report
    assert report["segments"] == report["vectors"] == len(snap.segments)
    assert list_dead_letters(c.bootstrap, c.topics) == []

    with capsys.disabled():
        print(
            f"\n[kill test] {len(KILL_ROTATION) + len(SCALED)} worker processes, "
            f"documents={len(ids)} (updated {len(updated)}, deleted {len(deleted)}), "
            f"final segments={len(snap.segments)}, vectors="
            f"{len(snap.vectors)}, cached embeddings={cached}, SIGKILLs={c.kills} "
            f"({dict(Counter(k.split()[1] for k in kill_log))}), kill phase "
            f"{killing_done - started:.0f}s, settled after {time.monotonic() - killing_done:.0f}s, "
            f"verify clean"
        )


# --- (2) every event delivered twice, reordered across documents ------------------------


class Duplicator(threading.Thread):
    """Delivers every stage event twice: re-publishes each message of the stage
    topics once, to the same partition, right behind the original (what a
    producer retry or a redelivery after a crash looks like to the consumer).
    What a stage emits for a copy is itself copied, so the duplication
    compounds down the pipeline."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        super().__init__(daemon=True, name="duplicator")
        self.bootstrap = bootstrap
        self.topic_names = topics
        self.stop_event = threading.Event()
        self.copied: Counter[str] = Counter()
        self.ready = threading.Event()

    def run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"duplicator-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": True,
                "session.timeout.ms": 6000,
            }
        )
        producer = Producer(
            {"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 2}
        )
        consumer.subscribe(self.topic_names, on_assign=lambda *_: self.ready.set())
        try:
            while not self.stop_event.is_set():
                for m in consumer.consume(200, timeout=0.3):
                    if m.error() is not None:
                        continue
                    if any(k == "kb-dup" for k, _ in (m.headers() or [])):
                        continue
                    producer.produce(
                        m.topic(),
                        value=m.value(),
                        key=m.key(),
                        partition=m.partition(),
                        headers=[("kb-dup", b"1")],
                    )
                    self.copied[m.topic()] += 1
                producer.poll(0)
        finally:
            producer.flush(30)
            consumer.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(60)


def embedded_total(port: int) -> float:
    """kbstream_embedded_texts_total of the embed worker: texts sent to the model."""
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith("kbstream_embedded_texts_total "):
            return float(line.split()[1])
    raise AssertionError("no kbstream_embedded_texts_total in the embed worker's metrics")


def shuffled_keeping_document_order(
    per_doc: dict[str, list[object]], rng: random.Random
) -> list[object]:
    queues = {d: list(evs) for d, evs in per_doc.items() if evs}
    out: list[object] = []
    while queues:
        d = rng.choice(sorted(queues))
        out.append(queues[d].pop(0))
        if not queues[d]:
            del queues[d]
    return out


SHARED_PARAGRAPH = (
    "Every document in this group repeats this paragraph about the shared harbour "
    "lighthouse, so the embedding cache must serve it after the first time."
)


@pytest.fixture(scope="module", params=RUNTIMES)
def duplicate_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tansu: str
) -> Iterator[dict]:
    """The same two phases (create 30 documents; then update 8 and delete 4)
    run twice in one pipeline: first into dataset `dup` with every lifecycle
    event published twice, every stage event delivered twice and documents
    interleaved at random; then, duplication off, into dataset `clean`."""
    from infra.kafka.broker import free_port

    rng = random.Random(77)
    root = tmp_path_factory.mktemp("dup")
    with fresh_database() as (url, _):
        c = Cluster(root, tansu, url, runtime=request.param)
        try:
            port = free_port()
            c.start_all(env={"embed": {"KBSTREAM_METRICS_PORT": str(port)}})
            docs: dict[str, Doc] = {}
            for i in range(30):
                if i % 3 == 0:
                    body = long_text(rng, i)
                else:
                    body = " ".join(sentence(rng, 3, i * 10 + s) for s in range(1 + i % 2))
                if i % 6 == 1:
                    body = SHARED_PARAGRAPH + "\n\n" + body
                docs[f"d{i:02d}"] = write_doc(c.corpus, f"d{i:02d}", body)
            ids = sorted(docs)
            v2: dict[str, Doc] = {}
            for d in ids[::4][:8]:
                old = docs[d].text
                keep = old.rsplit("\n\n", 1)[0] if "\n\n" in old else old
                v2[d] = write_doc(c.corpus, d, keep + f"\n\nUpdated {d}: {sentence(rng, 4, 3)}", 2)
            gone = [d for d in ids[2::7] if d not in v2][:4]

            def phases(dataset: str) -> tuple[dict[str, list], dict[str, list]]:
                one = {d: [docs[d].event(dataset)] for d in ids}
                two: dict[str, list] = {d: [v2[d].event(dataset, DocumentUpdated)] for d in v2}
                two.update({d: [DocumentDeleted(dataset_id=dataset, document_id=d)] for d in gone})
                return one, two

            def expected(dataset: str) -> dict[str, dict[str, str]]:
                return {
                    d: expected_segments(c, dataset, v2.get(d, docs[d]))
                    for d in ids
                    if d not in gone
                }

            texts1 = {t for d in ids for t in expected_segments(c, "x", docs[d]).values()}
            texts2 = texts1 | {t for d in v2 for t in expected_segments(c, "x", v2[d]).values()}
            # a delete prunes the tenant's cached vectors of texts no other segment
            # of the tenant uses: the clean run embeds those texts again
            last_users = {
                t
                for d in ids
                if d not in gone
                for t in expected_segments(c, "x", v2.get(d, docs[d])).values()
            }
            pruned = {t for d in gone for t in expected_segments(c, "x", docs[d]).values()}
            pruned -= last_users
            out: dict = {"ids": ids, "updated": sorted(v2), "deleted": gone, "pruned": pruned}

            dup = Duplicator(
                c.bootstrap,
                [c.topics.parsed, c.topics.segments, c.topics.embedded, c.topics.progress],
            )
            dup.start()
            assert dup.ready.wait(60)
            one, two = phases("dup")
            twice = {d: [e for e in evs for _ in range(2)] for d, evs in one.items()}
            c.publish(*shuffled_keeping_document_order(twice, rng))  # type: ignore[arg-type]
            snap1 = c.wait_settled(
                "dup", ids, 240, lambda s: all(s.status(d) is IndexingStatus.COMPLETED for d in ids)
            )
            out["dup_phase1_docs"] = snap1.docs
            out["embedded_after_phase1"] = embedded_total(port)
            twice = {d: [e for e in evs for _ in range(2)] for d, evs in two.items()}
            c.publish(*shuffled_keeping_document_order(twice, rng))  # type: ignore[arg-type]
            exp_dup = expected("dup")
            out["dup"] = c.wait_settled(
                "dup",
                ids,
                240,
                lambda s: (
                    all(s.doc_segments(d) == set(exp_dup[d]) for d in exp_dup)
                    and all(s.status(d) is IndexingStatus.DELETED for d in gone)
                ),
            )
            out["embedded_after_dup"] = embedded_total(port)
            dup.stop()
            out["copied"] = {t.rsplit(".", 1)[-1]: n for t, n in dup.copied.items()}

            one, two = phases("clean")
            c.publish(*[e for evs in one.values() for e in evs])  # type: ignore[arg-type]
            c.wait_settled(
                "clean",
                ids,
                240,
                lambda s: all(s.status(d) is IndexingStatus.COMPLETED for d in ids),
            )
            c.publish(*[e for evs in two.values() for e in evs])  # type: ignore[arg-type]
            exp_clean = expected("clean")
            out["clean"] = c.wait_settled(
                "clean",
                ids,
                240,
                lambda s: (
                    all(s.doc_segments(d) == set(exp_clean[d]) for d in exp_clean)
                    and all(s.status(d) is IndexingStatus.DELETED for d in gone)
                ),
            )
            out["embedded_after_clean"] = embedded_total(port)
            # the dup dataset again, now that every late copy has long been consumed
            out["dup"] = c.wait_settled(
                "dup", ids, 60, lambda s: all(s.doc_segments(d) == set(exp_dup[d]) for d in exp_dup)
            )
            provider, model, _ = c.container.model_identity
            with c.container.uow(readonly=True) as uow:
                out["cache_rows"] = uow.embeddings.count(provider, model)
            out["texts1"], out["texts2"] = texts1, texts2
            out["expected"] = {"dup": exp_dup, "clean": exp_clean}
            out["verify"] = {ds: c.verify(ds) for ds in ("dup", "clean")}
            out["dead_letters"] = list_dead_letters(c.bootstrap, c.topics)
            yield out
        finally:
            c.close()


def test_duplicated_and_reordered_events_give_the_clean_state(duplicate_runs, capsys) -> None:
    r = duplicate_runs
    dup, clean = r["dup"], r["clean"]
    deleted = set(r["deleted"])
    assert_exact(dup, r["expected"]["dup"], deleted)
    assert_exact(clean, r["expected"]["clean"], deleted)
    assert all(r["copied"].get(t, 0) > 0 for t in r["copied"]) and len(r["copied"]) == 4
    # the same documents, segments (content and order), vectors and keyword entities
    for d in r["ids"]:
        assert dup.status(d) == clean.status(d), d
        if d in deleted:
            continue
        a, b = list(r["expected"]["dup"][d]), list(r["expected"]["clean"][d])
        assert [r["expected"]["dup"][d][n] for n in a] == [r["expected"]["clean"][d][n] for n in b]
        for na, nb in zip(a, b, strict=True):
            assert dup.texts[na] == clean.texts[nb] == d, (d, na)
            assert dup.seg_hash[na] == clean.seg_hash[nb]
        assert dup.docs[d].segment_count == clean.docs[d].segment_count == len(a)
    # nothing embedded twice: the model saw each distinct text exactly once, the
    # second copies were all cache hits, and so was the clean run, but for the
    # texts only the deleted documents had (their delete pruned them)
    assert r["pruned"]
    assert r["embedded_after_phase1"] == len(r["texts1"])
    assert sum(st.embedded_texts for st in r["dup_phase1_docs"].values()) == len(r["texts1"])
    assert r["embedded_after_dup"] == len(r["texts2"])
    assert r["embedded_after_clean"] == r["embedded_after_dup"] + len(r["pruned"])
    assert r["cache_rows"] == len(r["texts2"]) - len(r["pruned"])
    for ds, (rc, report) in r["verify"].items():
        assert rc == 0 and report["clean"], (ds, report)
    assert r["dead_letters"] == []
    with capsys.disabled():
        print(
            f"\n[duplicates] {len(r['ids'])} documents, segments dup={len(dup.segments)} "
            f"clean={len(clean.segments)}, stage events duplicated: {r['copied']}, texts "
            f"embedded={r['embedded_after_dup']:.0f} (distinct texts {len(r['texts2'])})"
        )


def test_duplicated_events_keep_the_documents_change_counters(duplicate_runs) -> None:
    r = duplicate_runs
    dup, clean = r["dup"], r["clean"]
    for d in r["ids"]:
        if d in r["deleted"]:
            continue
        a, b = dup.docs[d], clean.docs[d]
        assert (a.segments_added, a.segments_kept, a.segments_removed) == (
            b.segments_added,
            b.segments_kept,
            b.segments_removed,
        ), d


# --- (3) PostgreSQL connections cut mid-run ---------------------------------------------


def test_workers_ride_out_database_and_milvus_outages(cluster_factory, capsys) -> None:
    """PostgreSQL drops every connection again and again, then refuses
    connections; then the Milvus server goes away and comes back. Documents keep
    arriving throughout. No worker dies or is restarted, nothing is
    dead-lettered, and everything completes exactly."""
    from kbstream.stack import MilvusLiteServer

    rng = random.Random(5)
    # capped backoff of 5 s (default 30 s) keeps the test short; the policy is the same
    c: Cluster = cluster_factory(retry_max_seconds=5)
    dataset = "outage"
    c.start_all()
    docs = {}
    for i in range(120):
        body = long_text(rng, i, 2) if i % 12 == 0 else sentence(rng, 4, i)
        docs[f"o{i:03d}"] = write_doc(c.corpus, f"o{i:03d}", body)
    ids = sorted(docs)
    expected = {d: expected_segments(c, dataset, docs[d]) for d in ids}
    c.publish(*[docs[d].event(dataset) for d in ids[:40]])
    assert wait_until(lambda: count_rows(c.container, "track_status", c.tenant, dataset) >= 5, 120)

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    db = c.db_name
    terminated = 0
    outage_started = time.monotonic()
    try:
        with admin.connect() as conn:
            # 1. every connection of the workers dropped, again and again, ~10 s
            c.publish(*[docs[d].event(dataset) for d in ids[40:70]])
            deadline = time.monotonic() + 10
            midway = ids[70:85]
            while time.monotonic() < deadline:
                terminated += terminate_connections(conn, db)
                time.sleep(0.3)
                if midway and deadline - time.monotonic() < 5:
                    c.publish(*[docs[d].event(dataset) for d in midway])
                    midway = []
            # 2. the database refuses connections altogether for ~8 s
            conn.execute(text(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false'))
            terminated += terminate_connections(conn, db)
            c.publish(*[docs[d].event(dataset) for d in ids[85:100]])
            time.sleep(8)
            conn.execute(text(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true'))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    db_outage = time.monotonic() - outage_started
    assert terminated > 0

    # 3. Milvus goes away for ~10 s while the backlog flows, and comes back
    port, data_dir = c.milvus.port, c.milvus.data_dir
    c.milvus.stop()
    c.publish(*[docs[d].event(dataset) for d in ids[100:]])
    time.sleep(10)
    c.milvus = MilvusLiteServer(data_dir, port).start()

    snap = c.wait_settled(
        dataset,
        ids,
        timeout=240,
        expected=lambda s: all(s.status(d) is IndexingStatus.COMPLETED for d in ids),
    )
    assert_exact(snap, expected, set())
    # they recovered by themselves: nobody restarted, nobody died, nothing given up on
    assert c.restarts == 0 and c.alive() == dict.fromkeys(PIPELINE, 1), c.alive()
    assert list_dead_letters(c.bootstrap, c.topics) == []
    retried: Counter[str] = Counter()
    for ws in c.workers.values():
        for w in ws:
            for line in w.log_text().splitlines():
                if "transient failure" in line:
                    retried[f"{w.stage}/{'milvus' if 'Milvus' in line else 'db'}"] += 1
    assert any(k.endswith("/db") for k in retried), f"no worker noticed the database: {retried}"
    assert "load_vectors/milvus" in retried, f"load_vectors did not notice Milvus: {retried}"
    rc, report = c.verify(dataset)
    assert rc == 0 and report["clean"], report
    with capsys.disabled():
        print(
            f"\n[outages] {len(ids)} documents, {len(snap.segments)} segments; PostgreSQL: "
            f"{terminated} backends terminated over {db_outage:.0f}s (incl. 8s refusing "
            f"connections); Milvus down 10s; transient retries {dict(retried)}; "
            f"all completed, verify clean"
        )


# --- (4) poison on every input topic; (6) dlq list/replay; verify --repair -------------


def _poison(topic_tag: str, good: bytes) -> list[tuple[str, bytes | None]]:
    """(kind, value): at least ten ways for a message not to be an event, each
    value unique per topic where the kind allows it."""
    import json

    base = json.loads(good)

    def variant(**changes: object) -> bytes:
        return json.dumps({**base, **changes}).encode()

    def without(field: str) -> bytes:
        return json.dumps({k: v for k, v in base.items() if k != field}).encode()

    return [
        ("not-json", b"\x00\xff\xfe<binary> " + topic_tag.encode()),
        ("empty-value", b""),
        ("null-value", None),
        ("json-array", json.dumps([1, 2, topic_tag]).encode()),
        ("json-string", json.dumps(topic_tag).encode()),
        ("json-null", b"null"),
        ("truncated-json", good[: len(good) // 2]),
        (
            "invalid-utf8-in-json",
            b'{"type": "document.created", "source": "\xff\xfe' + topic_tag.encode() + b'"}',
        ),
        ("unknown-schema-version", variant(schema_version=99)),
        ("schema-version-string", variant(schema_version="1")),
        ("schema-version-bool", variant(schema_version=True)),
        ("unknown-type", variant(type=f"{topic_tag}.exploded")),
        ("missing-field", without("dataset_id")),
        ("extra-field", variant(smuggled=topic_tag)),
        ("bad-id", variant(document_id="../../etc/passwd " + topic_tag)),
        ("negative-version", variant(version=-1)),
        ("deep-nesting", b"[" * 100_000 + topic_tag.encode() + b"]" * 100_000),
        ("huge-integer", b'{"schema_version": 1, "version": ' + b"9" * 5000 + b"}"),
        ("nan", variant(occurred_at=float("nan"))),
    ]


CONSUMERS = {
    "lifecycle": ("parse",),
    "parsed": ("split",),
    "segments": ("embed", "index_keywords"),  # two consumer groups read it
    "embedded": ("load_vectors",),
    "progress": ("track_status",),
}


@pytest.fixture(scope="module", params=RUNTIMES)
def poisoned(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tansu: str
) -> Iterator[dict]:
    """One pipeline, good documents published in three waves with poison on
    every input topic between them."""
    from domain.events import (
        DocumentParsed,
        EmbeddedRef,
        SegmentPayload,
        SegmentsEmbedded,
        SegmentsLoaded,
        SegmentsSplit,
        encode_event,
    )
    from infra.kafka.producer import EventPublisher

    rng = random.Random(9)
    root = tmp_path_factory.mktemp("poison")
    with fresh_database() as (url, _):
        c = Cluster(root, tansu, url, runtime=request.param)
        try:
            c.start_all()
            dataset = "poisoned"
            docs = {}
            for i in range(30):
                body = long_text(rng, i, 2) if i % 10 == 0 else sentence(rng, 4, i)
                docs[f"p{i:02d}"] = write_doc(c.corpus, f"p{i:02d}", body)
            ids = sorted(docs)
            common = {"dataset_id": dataset, "document_id": "p00", "version": 1}
            good = {
                "lifecycle": docs["p00"].event(dataset),
                "parsed": DocumentParsed(source="x", text="y", chars=1, **common),
                "segments": SegmentsSplit(
                    segments=[
                        SegmentPayload(index_node_id="n", doc_hash="h", position=0, content="c")
                    ],
                    **common,
                ),
                "embedded": SegmentsEmbedded(
                    provider="p",
                    model="m",
                    segments=[EmbeddedRef(index_node_id="n", doc_hash="h")],
                    **common,
                ),
                "progress": SegmentsLoaded(index_node_ids=["n"], **common),
            }
            raw = EventPublisher(c.bootstrap, client_id="poisoner")
            sent: Counter[tuple[str, str, str, bytes | None]] = Counter()
            kinds: set[str] = set()
            poison = {name: _poison(name, encode_event(ev)) for name, ev in good.items()}
            waves = [ids[:10], ids[10:20], ids[20:]]
            for w, wave in enumerate(waves):
                c.publish(*[docs[d].event(dataset) for d in wave])
                if w == len(waves) - 1:
                    break
                time.sleep(2)
                for name, items in poison.items():
                    topic = getattr(c.topics, name)
                    for k, (kind, value) in enumerate(items):
                        if k % 2 != w:
                            continue
                        key = rng.choice(ids)  # shares a partition with a good document
                        raw.produce_raw(topic, value, key=key.encode())
                        kinds.add(kind)
                        for stage in CONSUMERS[name]:
                            sent[(stage, topic, key, value)] += 1
                raw.flush()
            raw.close()
            snap = c.wait_settled(
                dataset,
                ids,
                240,
                lambda s: all(s.status(d) is IndexingStatus.COMPLETED for d in ids),
            )
            expected = {d: expected_segments(c, dataset, docs[d]) for d in ids}
            n = sum(sent.values())
            wait_until(lambda: len(list_dead_letters(c.bootstrap, c.topics)) >= n, 120, 0.5)
            c.drain()  # anything beyond the poison would show up now
            yield {
                "cluster": c,
                "dataset": dataset,
                "ids": ids,
                "snap": snap,
                "expected": expected,
                "sent": sent,
                "kinds": kinds,
                "per_topic": {name: len(items) for name, items in poison.items()},
            }
        finally:
            c.close()


def test_poison_on_every_topic_is_dead_lettered_and_nothing_else(poisoned, capsys) -> None:
    c: Cluster = poisoned["cluster"]
    assert len(poisoned["kinds"]) >= 10 and min(poisoned["per_topic"].values()) >= 10
    letters = list_dead_letters(c.bootstrap, c.topics)
    got = Counter(
        (d.headers.get("kb-stage"), d.headers.get("kb-original-topic"), d.key, d.value or None)
        for d in letters
    )
    want = Counter({(s, t, k, v or None): n for (s, t, k, v), n in poisoned["sent"].items()})
    assert got == want
    for d in letters:
        assert d.headers["kb-error-class"] == "InvalidEvent", d.to_dict()
        assert d.headers["kb-error"] and d.headers["kb-attempts"] == "1"
        assert int(d.headers["kb-original-offset"]) >= 0
    # the consumers kept consuming: the good documents around the poison are indexed
    assert_exact(poisoned["snap"], poisoned["expected"], set())
    assert c.restarts == 0 and c.alive() == dict.fromkeys(PIPELINE, 1), c.alive()
    with capsys.disabled():
        print(
            f"\n[poison] {sum(poisoned['per_topic'].values())} poison messages "
            f"({len(poisoned['kinds'])} kinds x 5 topics) -> {len(letters)} dead letters "
            f"(segments counts twice: two groups); {len(poisoned['ids'])} good documents completed"
        )


def test_dlq_list_and_replay_through_the_cli(poisoned) -> None:
    import json

    c: Cluster = poisoned["cluster"]
    before = list_dead_letters(c.bootstrap, c.topics)
    listed = json.loads(c.cli("dlq", "list", "--json").stdout)
    assert len(listed) == len(before)
    assert Counter((d["stage"], d["original_topic"]) for d in listed) == Counter(
        (d.headers["kb-stage"], d.headers["kb-original-topic"]) for d in before
    )
    for d in listed:
        assert d["error_class"] == "InvalidEvent" and d["error"]
        assert d["original_offset"] is not None and d["failed_at"]

    n_parse = sum(1 for d in before if d.headers["kb-stage"] == "parse")
    dry = json.loads(c.cli("dlq", "replay", "--stage", "parse", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["replayed"] == n_parse
    c.drain()
    assert len(list_dead_letters(c.bootstrap, c.topics)) == len(before)

    # replayed to their original topic, the poison is dead-lettered again by parse
    done = json.loads(c.cli("dlq", "replay", "--stage", "parse", "--json").stdout)
    assert done["replayed"] == n_parse and not done["dry_run"]
    assert {d["original_topic"] for d in done["letters"]} == {c.topics.lifecycle}
    assert wait_until(
        lambda: len(list_dead_letters(c.bootstrap, c.topics)) >= len(before) + n_parse, 60, 0.5
    )
    c.drain()
    after = list_dead_letters(c.bootstrap, c.topics)
    new = [d for d in after if d not in before]
    assert len(after) == len(before) + n_parse
    assert Counter(d.headers["kb-stage"] for d in new) == {"parse": n_parse}
    assert Counter(d.value or None for d in new) == Counter(
        d.value or None for d in before if d.headers["kb-stage"] == "parse"
    )

    # a full replay commits its position: a second one replays nothing old
    full = json.loads(c.cli("dlq", "replay", "--json").stdout)
    assert full["replayed"] == len(after)
    assert wait_until(lambda: len(list_dead_letters(c.bootstrap, c.topics)) > len(after), 60, 0.5)
    c.drain()
    grown = list_dead_letters(c.bootstrap, c.topics)
    again = json.loads(c.cli("dlq", "replay", "--dry-run", "--json").stdout)
    assert again["replayed"] == len(grown) - len(after)
    # the good documents are untouched by all of it
    snap = c.snapshot(poisoned["dataset"])
    assert_exact(snap, poisoned["expected"], set())
    assert c.alive() == dict.fromkeys(PIPELINE, 1), c.alive()


def test_verify_finds_and_repairs_drift(poisoned) -> None:
    import numpy as np

    from domain.ports import KeywordRow
    from infra.vectors import VectorRow

    c: Cluster = poisoned["cluster"]
    ds = poisoned["dataset"]
    con = c.container
    rc, report = c.verify(ds)
    assert rc == 0 and report["clean"], report
    snap = c.snapshot(ds)
    nodes = sorted(snap.segments)
    lost_vectors, lost_texts = nodes[:3], nodes[3:6]
    retrying(lambda: con.vectors.delete(lost_vectors))
    retrying(lambda: con.keyword_index.delete(lost_texts))
    orphan = str(uuid.uuid4())
    vec = np.random.default_rng(1).standard_normal(con.vectors.dim).astype("float32")
    row = VectorRow(orphan, vec / np.linalg.norm(vec), DocKey(c.tenant, ds, "p01"))
    retrying(lambda: con.vectors.upsert([row]))
    stray = str(uuid.uuid4())
    text = KeywordRow(stray, DocKey(c.tenant, ds, "p02"), "lighthouse")
    retrying(lambda: con.keyword_index.upsert([text]))
    assert wait_until(lambda: orphan in retrying(lambda: con.vectors.ids(c.tenant, ds)), 30, 0.5)

    rc, report = c.verify(ds)
    assert rc == 1 and not report["clean"]
    found = {(d["problem"], d["index_node_id"]) for d in report["drift"]}
    assert found == (
        {("missing_vector", n) for n in lost_vectors}
        | {("missing_keywords", n) for n in lost_texts}
        | {("orphan_vector", orphan), ("orphan_keywords", stray)}
    ), report["drift"]

    rc, report = c.verify(ds, repair=True)
    assert rc == 0 and report["clean"], report
    assert {(d["problem"], d["index_node_id"]) for d in report["repaired"]} == found
    assert_exact(c.snapshot(ds), poisoned["expected"], set())
    rc, report = c.verify(ds)
    assert rc == 0 and report["clean"], report
