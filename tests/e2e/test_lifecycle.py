"""The whole document lifecycle, end to end: one in-process pipeline on the
real tansu broker, PostgreSQL, milvus-lite and the real all-MiniLM-L6-v2 model.

Every scenario publishes upstream lifecycle events with explicit versions,
waits for the documents to settle, and checks the exact final state of the
three stores per document (segment rows = Milvus vectors = keyword index,
no duplicates, positions, contents) and the exact work done (what reached the
model, the embedding cache, the documents' added/kept/removed counters)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from domain.documents import Document, IndexingStatus
from domain.events import (
    DocForm,
    DocumentCreated,
    DocumentDeleted,
    DocumentUpdated,
    Event,
    ImportedSegment,
    ProcessRule,
    SegmentDeleted,
    SegmentsBatchImported,
)
from domain.segments import build_segments, compute_doc_hash, make_index_node_id
from domain.splitting import split_document
from infra.db.models import SegmentRow
from kbstream.indexing import index_paths
from kbstream.search import search
from tests.harness import RUNTIMES, Pipeline, make_settings

pytestmark = pytest.mark.e2e

# One paragraph = one segment: a hard "\n\n" boundary, no overlap, paragraphs
# well under the model's 256 tokens. Makes "exactly which segments" exact.
PARAGRAPHS = ProcessRule(mode="custom", separator="\n\n", max_tokens=200, chunk_overlap=0)

TOPICS = [
    "consumer groups",
    "partition rebalancing",
    "offset commits",
    "dead letter topics",
    "embedding caches",
    "vector upserts",
    "keyword postings",
    "document versions",
    "stale event filtering",
    "claim check payloads",
    "retry backoff",
    "schema evolution",
    "replay from the earliest offset",
    "tombstones for deleted documents",
    "batch imports of question answer pairs",
    "parent and child chunks",
    "reciprocal rank fusion",
    "token aware splitting",
    "milvus partition keys",
    "postgres row locks",
]


def paragraph(i: int, nonce: str, variant: str = "") -> str:
    topic = TOPICS[i % len(TOPICS)]
    return (
        f"Section {i} of the {nonce} handbook{variant} covers {topic}. "
        f"Operators who run the indexer in production rely on {topic} to keep the "
        f"vector index and the keyword index in step with every document, and the "
        f"section lists the failure modes seen when {topic} is misconfigured, "
        f"how to detect them from metrics, and how to recover without reindexing."
    )


def text_of(paragraphs: Sequence[str]) -> str:
    return "\n\n".join(paragraphs)


# --- the pipeline -------------------------------------------------------------


class Spy:
    """Records the work the stages do: every text sent to the real model,
    every id upserted into Milvus's vectors and into its keyword index. Wraps
    the adapters' methods on the shared container."""

    def __init__(self, container: Any) -> None:
        self.texts: list[str] = []
        self.upserts: list[str] = []
        self.keywords: list[str] = []
        provider, vectors, index = container.provider, container.vectors, container.keyword_index
        embed, upsert, upsert_texts = provider.embed, vectors.upsert, index.upsert

        def spy_embed(texts: Sequence[str]) -> list[list[float]]:
            self.texts.extend(texts)
            return embed(texts)  # type: ignore[no-any-return]

        def spy_upsert(rows: Sequence[Any]) -> int:
            self.upserts.extend(r.index_node_id for r in rows)
            return upsert(rows)  # type: ignore[no-any-return]

        def spy_upsert_texts(rows: Sequence[Any]) -> int:
            self.keywords.extend(r.index_node_id for r in rows)
            return upsert_texts(rows)  # type: ignore[no-any-return]

        provider.embed, vectors.upsert, index.upsert = spy_embed, spy_upsert, spy_upsert_texts

    def mark(self) -> tuple[int, int, int]:
        return len(self.texts), len(self.upserts), len(self.keywords)

    def since(self, mark: tuple[int, int, int]) -> list[str]:
        """Texts sent to the model since ``mark``."""
        return self.texts[mark[0] :]

    def writes_since(self, mark: tuple[int, int, int]) -> tuple[set[str], set[str]]:
        """(ids upserted into the vector index, into the keyword index) since ``mark``."""
        return set(self.upserts[mark[1] :]), set(self.keywords[mark[2] :])


@dataclass
class Env:
    pipeline: Pipeline
    spy: Spy
    db_url: str
    home: Path


@pytest.fixture(scope="module", params=RUNTIMES)
def env(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tansu: str,
    pg_server_url: str,
) -> Iterator[Env]:
    """The whole suite runs once per runtime, with the same expectations."""
    home = tmp_path_factory.mktemp("lifecycle")
    prefix = f"lc{uuid.uuid4().hex[:8]}."
    settings = make_settings(home, tansu, prefix, database_url=pg_server_url, runtime=request.param)
    pipeline = Pipeline(settings)
    spy = Spy(pipeline.container)
    pipeline.container.provider.warm_up()  # load the model once, before any timing
    with pipeline:
        yield Env(pipeline, spy, pg_server_url, home)


@pytest.fixture
def ds() -> str:
    return f"lc-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def nonce() -> str:
    # makes every test's text new to the shared embedding cache
    return f"zq{uuid.uuid4().hex[:8]}"


# --- helpers ------------------------------------------------------------------


def created(
    ds: str,
    doc: str,
    text: str,
    version: int,
    form: DocForm = DocForm.TEXT,
    rule: ProcessRule = PARAGRAPHS,
) -> DocumentCreated:
    return DocumentCreated(
        dataset_id=ds,
        document_id=doc,
        source=f"{doc}.txt",
        content=text,
        version=version,
        doc_form=form,
        process_rule=rule,
    )


def updated(
    ds: str,
    doc: str,
    text: str,
    version: int,
    form: DocForm = DocForm.TEXT,
    rule: ProcessRule = PARAGRAPHS,
) -> DocumentUpdated:
    return DocumentUpdated(
        dataset_id=ds,
        document_id=doc,
        source=f"{doc}.txt",
        content=text,
        version=version,
        doc_form=form,
        process_rule=rule,
    )


def deleted(ds: str, doc: str, version: int) -> DocumentDeleted:
    return DocumentDeleted(dataset_id=ds, document_id=doc, version=version)


@dataclass(frozen=True)
class Row:
    id: int
    index_node_id: str
    position: int
    doc_hash: str
    content: str
    answer: str | None
    parent: str | None
    job_id: str | None
    updated_at: datetime | None


def seg_rows(p: Pipeline, ds: str, doc: str) -> dict[str, Row]:
    s = SegmentRow.__table__
    with p.container.database.connect() as conn:
        rows = conn.execute(
            select(
                s.c.id,
                s.c.index_node_id,
                s.c.position,
                s.c.doc_hash,
                s.c.content,
                s.c.answer,
                s.c.parent,
                s.c.job_id,
                s.c.updated_at,
            ).where(s.c.tenant_id == p.tenant, s.c.dataset_id == ds, s.c.document_id == doc)
        )
        return {r.index_node_id: Row(*r) for r in rows}


def ordered(rows: dict[str, Row]) -> list[Row]:
    return sorted(rows.values(), key=lambda r: r.position)


def cache_count(p: Pipeline) -> int:
    provider, model, _ = p.container.model_identity
    with p.container.uow(readonly=True) as uow:
        return uow.embeddings.count(provider, model)


def milvus_duplicates(p: Pipeline, ds: str) -> dict[str, int]:
    rows = p.container.vectors.ids_with_duplicates(p.tenant, ds)
    return {node: n for node, (_, n) in rows.items() if n != 1}


def assert_exact(
    p: Pipeline,
    ds: str,
    doc: str,
    contents: Sequence[str],
    status: IndexingStatus = IndexingStatus.COMPLETED,
) -> Document:
    """The document holds exactly ``contents``, in this order, in every store."""
    snap = p.snapshot(ds, doc)
    rows = seg_rows(p, ds, doc)
    assert snap.state is not None
    assert snap.state.status is status, snap.state
    assert snap.segments == set(rows)
    assert snap.vectors == snap.segments, "Milvus differs from the segment rows"
    assert snap.texts == snap.segments, "the keyword index differs from the segment rows"
    assert not milvus_duplicates(p, ds)
    assert [r.content for r in ordered(rows)] == list(contents)
    assert [r.position for r in ordered(rows)] == list(range(len(contents)))
    assert snap.state.segment_count == len(contents)
    return snap.state


def assert_gone(p: Pipeline, ds: str, doc: str) -> None:
    snap = p.snapshot(ds, doc)
    assert snap.segments == set() and snap.vectors == set() and snap.texts == set(), snap
    assert snap.state is not None and snap.state.status is IndexingStatus.DELETED
    assert snap.state.segment_count == 0


def wait_until(cond: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout}s")


def job(p: Pipeline, job_id: str, ds: str | None = None) -> dict[str, Any] | None:
    """The tenant's one job called ``job_id`` (in ``ds``, if given)."""
    with p.container.uow(readonly=True) as uow:
        found = uow.jobs.find(p.tenant, job_id, ds)
    assert len(found) <= 1, found
    return found[0] if found else None


def wait_job(p: Pipeline, job_id: str, ds: str | None = None) -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (j := job(p, job_id, ds)) and j["status"] in ("completed", "error") and j,
        what=f"job {job_id} finished",
    )


# --- create and update --------------------------------------------------------


def test_create_indexes_every_segment_once(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    paras = [paragraph(i, nonce) for i in range(5)]
    cache_before, mark = cache_count(p), env.spy.mark()
    p.publish(created(ds, "doc", text_of(paras), 1))
    p.wait_for(ds, ["doc"], min_version=1)
    st = assert_exact(p, ds, "doc", paras)
    assert (st.version, st.segments_added, st.segments_kept, st.segments_removed) == (1, 5, 0, 0)
    assert st.embedded_texts == 5 and st.cache_hits == 0
    assert sorted(env.spy.since(mark)) == sorted(paras)
    assert cache_count(p) == cache_before + 5


def test_update_of_one_paragraph_reembeds_only_that_segment(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    v1 = [paragraph(i, nonce) for i in range(15)]
    p.publish(created(ds, "long", text_of(v1), 1))
    p.wait_for(ds, ["long"], min_version=1)
    assert_exact(p, ds, "long", v1)
    before = seg_rows(p, ds, "long")
    cache_before, mark = cache_count(p), env.spy.mark()

    v2 = list(v1)
    v2[7] = paragraph(7, nonce, variant=" (revised)")
    p.publish(updated(ds, "long", text_of(v2), 2))
    p.wait_for(ds, ["long"], min_version=2)
    st = assert_exact(p, ds, "long", v2)

    assert (st.version, st.segments_added, st.segments_kept, st.segments_removed) == (2, 1, 14, 1)
    assert st.embedded_texts == 1 and st.cache_hits == 0
    assert env.spy.since(mark) == [v2[7]], "only the changed paragraph may reach the model"
    assert cache_count(p) == cache_before + 1

    after = seg_rows(p, ds, "long")
    gone = set(before) - set(after)
    new = set(after) - set(before)
    assert len(gone) == 1 and before[gone.pop()].content == v1[7]
    assert len(new) == 1 and after[next(iter(new))].content == v2[7]
    kept = set(before) & set(after)
    assert len(kept) == 14
    for node in kept:
        # untouched: the same row (only its status column may be touched on completion)
        assert replace(after[node], updated_at=None) == replace(before[node], updated_at=None)
    assert kept <= p.snapshot(ds, "long").vectors
    # no vector write and no keyword write for a kept segment
    assert env.spy.writes_since(mark) == (new, new)


def test_update_of_one_paragraph_with_the_automatic_rule(env: Env, ds: str, nonce: str) -> None:
    """The default rule packs paragraphs into ~256-token chunks with overlap:
    one edited paragraph re-embeds only the chunks whose text changed."""
    p = env.pipeline
    auto = ProcessRule()
    v1 = [paragraph(i, nonce) for i in range(40)]
    p.publish(created(ds, "auto", text_of(v1), 1, rule=auto))
    p.wait_for(ds, ["auto"], min_version=1)
    before = seg_rows(p, ds, "auto")
    mark = env.spy.mark()

    v2 = list(v1)
    v2[20] = v1[20].replace("recover", "restore", 1)  # one word, same length in tokens
    assert v2[20] != v1[20]
    p.publish(updated(ds, "auto", text_of(v2), 2, rule=auto))
    st = p.wait_for(ds, ["auto"], min_version=2)["auto"]
    after = seg_rows(p, ds, "auto")
    snap = p.snapshot(ds, "auto")
    assert snap.segments == snap.vectors == snap.texts == set(after)

    new_hashes = {r.doc_hash for r in after.values()} - {r.doc_hash for r in before.values()}
    assert st.embedded_texts == len(new_hashes) == len(env.spy.since(mark))
    assert st.segments_added == len(set(after) - set(before))
    assert st.segments_removed == len(set(before) - set(after))
    assert st.segments_kept == len(set(after) & set(before))
    assert 0 < st.embedded_texts < len(after) / 2, (st.embedded_texts, len(after))
    print(f"\nautomatic rule: one edited paragraph re-embedded {st.embedded_texts} of {len(after)}")


def test_update_that_removes_and_inserts_paragraphs(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    v1 = [paragraph(i, nonce) for i in range(15)]
    p.publish(created(ds, "doc", text_of(v1), 1))
    p.wait_for(ds, ["doc"], min_version=1)
    before = seg_rows(p, ds, "doc")
    cache_before, mark = cache_count(p), env.spy.mark()

    # drop three paragraphs, insert one new at the top: every kept one moves
    v2 = [paragraph(99, nonce)] + [t for i, t in enumerate(v1) if i not in (2, 7, 11)]
    p.publish(updated(ds, "doc", text_of(v2), 2))
    p.wait_for(ds, ["doc"], min_version=2)
    st = assert_exact(p, ds, "doc", v2)
    assert (st.segments_added, st.segments_kept, st.segments_removed) == (1, 12, 3)
    assert st.embedded_texts == 1 and env.spy.since(mark) == [v2[0]]
    assert cache_count(p) == cache_before + 1
    after = seg_rows(p, ds, "doc")
    for node in set(before) & set(after):
        assert after[node].id == before[node].id  # re-positioned in place, not re-inserted
    new = set(after) - set(before)
    assert env.spy.writes_since(mark) == (new, new), "only the new segment is loaded"

    # removing only: nothing to embed, the document completes straight from split
    mark = env.spy.mark()
    v3 = v2[:5]
    p.publish(updated(ds, "doc", text_of(v3), 3))
    p.wait_for(ds, ["doc"], min_version=3)
    st = assert_exact(p, ds, "doc", v3)
    assert (st.segments_added, st.segments_kept, st.segments_removed) == (0, 5, 8)
    assert st.embedded_texts == 0 and st.cache_hits == 0 and env.spy.since(mark) == []
    assert env.spy.writes_since(mark) == (set(), set())


def test_update_back_to_a_previous_text_uses_the_cache(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    v1 = [paragraph(i, nonce) for i in range(4)]
    v2 = [paragraph(i, nonce, " again") for i in range(4)]
    p.publish(created(ds, "doc", text_of(v1), 1))
    p.wait_for(ds, ["doc"], min_version=1)
    p.publish(updated(ds, "doc", text_of(v2), 2))
    p.wait_for(ds, ["doc"], min_version=2)
    cache_before, mark = cache_count(p), env.spy.mark()
    p.publish(updated(ds, "doc", text_of(v1), 3))
    p.wait_for(ds, ["doc"], min_version=3)
    st = assert_exact(p, ds, "doc", v1)
    assert (st.segments_added, st.segments_kept, st.segments_removed) == (4, 0, 4)
    assert st.embedded_texts == 0 and st.cache_hits == 4
    assert env.spy.since(mark) == [] and cache_count(p) == cache_before


# --- deletes ------------------------------------------------------------------


def test_delete_removes_everything(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    paras = [paragraph(i, nonce) for i in range(6)]
    p.publish(created(ds, "doc", text_of(paras), 1), created(ds, "other", paragraph(50, nonce), 1))
    p.wait_for(ds, ["doc", "other"], min_version=1)
    assert_exact(p, ds, "doc", paras)
    p.publish(deleted(ds, "doc", 2))
    st = p.wait_for(ds, ["doc"], statuses=[IndexingStatus.DELETED], min_version=2)["doc"]
    assert st.segments_removed == 6
    p.drain()
    assert_gone(p, ds, "doc")
    assert_exact(p, ds, "other", [paragraph(50, nonce)])  # the neighbour is untouched
    assert p.container.vectors.count(p.tenant, ds) == 1

    # deleted, then created again with a newer version: a fresh document, whose
    # texts are embedded again: the delete pruned the cached vectors only it used
    p.publish(created(ds, "doc", text_of(paras[:2]), 3))
    st = p.wait_for(ds, ["doc"], min_version=3)["doc"]
    assert_exact(p, ds, "doc", paras[:2])
    assert st.embedded_texts == 2 and st.cache_hits == 0


@pytest.mark.parametrize("reached", ["nothing", "splitting", "indexing"])
def test_delete_right_after_create_leaves_nothing(
    env: Env, ds: str, nonce: str, reached: str
) -> None:
    p = env.pipeline
    paras = [paragraph(i, nonce) for i in range(30)]
    p.publish(created(ds, "doc", text_of(paras), 1))
    seen = None
    if reached != "nothing":
        wanted = {
            "splitting": {IndexingStatus.PARSING, IndexingStatus.SPLITTING},
            "indexing": {IndexingStatus.INDEXING},
        }[reached]
        seen = wait_until(
            lambda: (
                (st := p.state(ds, "doc")) is not None
                and (st.status in wanted or st.status.finished)
                and st.status
            ),
            what=f"create reaching {reached}",
        )
    p.publish(deleted(ds, "doc", 2))
    p.wait_for(ds, ["doc"], statuses=[IndexingStatus.DELETED], min_version=2)
    p.drain()  # nothing still in flight may bring a row, vector or posting back
    assert_gone(p, ds, "doc")
    assert p.container.vectors.count(p.tenant, ds) == 0
    assert p.container.keyword_index.count(p.tenant, ds) == 0
    print(f"\ndelete published when the create had reached: {seen or 'nothing'}")


def test_segment_deleted_by_index_node_id_and_by_segment_id(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    paras = [paragraph(i, nonce) for i in range(5)]
    p.publish(created(ds, "doc", text_of(paras), 1))
    p.wait_for(ds, ["doc"], min_version=1)
    rows = ordered(seg_rows(p, ds, "doc"))
    mark = env.spy.mark()

    by_node = rows[1]
    p.publish(
        SegmentDeleted(
            dataset_id=ds, document_id="doc", index_node_id=by_node.index_node_id, version=1
        )
    )
    wait_until(
        lambda: (
            by_node.index_node_id not in (s := p.snapshot(ds, "doc")).vectors
            and by_node.index_node_id not in s.texts
            and by_node.index_node_id not in s.segments
        ),
        what="segment deleted by index_node_id",
    )
    by_id = rows[3]
    p.publish(SegmentDeleted(dataset_id=ds, document_id="doc", segment_id=by_id.id, version=1))
    wait_until(
        lambda: (
            by_id.index_node_id not in (s := p.snapshot(ds, "doc")).vectors
            and by_id.index_node_id not in s.texts
            and by_id.index_node_id not in s.segments
        ),
        what="segment deleted by segment id",
    )
    p.drain()
    snap = p.snapshot(ds, "doc")
    assert snap.state is not None and snap.state.status is IndexingStatus.COMPLETED
    assert snap.state.segment_count == 3
    left = {r.index_node_id for r in rows} - {by_node.index_node_id, by_id.index_node_id}
    assert snap.segments == snap.vectors == snap.texts == left
    assert env.spy.since(mark) == []

    # deleting a segment that is already gone, or of another document, is a no-op
    p.publish(
        SegmentDeleted(
            dataset_id=ds, document_id="doc", index_node_id=by_node.index_node_id, version=1
        ),
        SegmentDeleted(dataset_id=ds, document_id="nope", segment_id=rows[0].id, version=1),
    )
    p.drain()
    snap = p.snapshot(ds, "doc")
    assert snap.segments == snap.vectors == snap.texts == left
    assert snap.state is not None and snap.state.segment_count == 3


# --- versions -----------------------------------------------------------------


def test_two_quick_updates_end_with_the_second(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    v1 = [paragraph(i, nonce) for i in range(6)]
    v2 = [paragraph(i, nonce, " draft") for i in range(6)]
    v3 = [*v1[:3], *(paragraph(i, nonce, " final") for i in range(3, 8))]
    p.publish(created(ds, "doc", text_of(v1), 1))
    p.wait_for(ds, ["doc"], min_version=1)
    p.publish(updated(ds, "doc", text_of(v2), 2), updated(ds, "doc", text_of(v3), 3))
    p.wait_for(ds, ["doc"], min_version=3)
    p.drain()
    st = assert_exact(p, ds, "doc", v3)
    assert st.version == 3
    # v3 keeps v1's first three paragraphs (if v2 was split in between, they come back
    # from the embedding cache) and indexes five new ones
    assert st.embedded_texts == 5
    assert st.segments_kept + st.segments_added == 8


def test_out_of_order_versions_drop_the_older(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    v1 = [paragraph(i, nonce) for i in range(4)]
    v2 = [paragraph(i, nonce, " stale") for i in range(4)]
    v3 = [paragraph(i, nonce, " newest") for i in range(4)]
    p.publish(created(ds, "doc", text_of(v1), 1))
    p.wait_for(ds, ["doc"], min_version=1)
    mark = env.spy.mark()
    p.publish(updated(ds, "doc", text_of(v3), 3), updated(ds, "doc", text_of(v2), 2))
    p.wait_for(ds, ["doc"], min_version=3)
    # a stale delete, a stale re-create and a stale segment delete are dropped too
    first = ordered(seg_rows(p, ds, "doc"))[0]
    p.publish(
        deleted(ds, "doc", 2),
        created(ds, "doc", text_of(v2), 2),
        SegmentDeleted(
            dataset_id=ds, document_id="doc", index_node_id=first.index_node_id, version=2
        ),
    )
    p.drain()
    st = assert_exact(p, ds, "doc", v3)
    assert st.version == 3
    assert (st.segments_added, st.segments_kept, st.segments_removed) == (4, 0, 4)
    assert sorted(env.spy.since(mark)) == sorted(v3), "the stale v2 must never be embedded"


def test_events_without_version_follow_the_small_upstream_versions(
    env: Env, ds: str, nonce: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Upstream numbers its revisions 3, 4, ...; a delete or an update
    without a version falls in line instead of leaping to wall-clock time."""
    p = env.pipeline
    v3 = [paragraph(i, nonce) for i in range(2)]
    v4 = [paragraph(i, nonce, " four") for i in range(3)]
    p.publish(created(ds, "doc", text_of(v3), 3))
    p.wait_for(ds, ["doc"], min_version=3)
    p.publish(DocumentDeleted(dataset_id=ds, document_id="doc"))
    st = p.wait_for(ds, ["doc"], statuses=[IndexingStatus.DELETED])["doc"]
    assert st.version == 3
    p.publish(created(ds, "doc", text_of(v4), 4))
    p.wait_for(ds, ["doc"], min_version=4)
    assert assert_exact(p, ds, "doc", v4).version == 4

    # an update without a version is the next one
    p.publish(
        DocumentUpdated(
            dataset_id=ds,
            document_id="doc",
            source="doc.txt",
            content=text_of(v3),
            process_rule=PARAGRAPHS,
        )
    )
    p.wait_for(ds, ["doc"], min_version=5)
    assert assert_exact(p, ds, "doc", v3).version == 5

    # a stale event is dropped, and says so
    with caplog.at_level(logging.WARNING, logger="consumers.parse"):
        p.publish(updated(ds, "doc", text_of(v4), 2))
        p.drain()
    st = assert_exact(p, ds, "doc", v3)
    reason = "document.updated v2 dropped: document is at v5 (completed)"
    assert (st.version, st.last_dropped) == (5, reason)
    assert any(r.levelno == logging.WARNING and reason in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


def test_versions_stay_small_through_the_cli(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    folder = env.home / f"versions-{nonce}"
    folder.mkdir()
    (folder / "a.txt").write_text(text_of([paragraph(0, nonce)]))
    versions = []
    for variant in ("", " changed"):
        if variant:
            (folder / "a.txt").write_text(text_of([paragraph(0, nonce, variant)]))
        summary = index_paths(p.container, [folder], ds, timeout=120)
        assert (summary.completed, summary.failed) == (1, 0), summary
        rows = json.loads(kb_cli(env, "status", "--dataset", ds, "--json").stdout)
        versions += [(r["version"], r["status"]) for r in rows]
    assert versions == [(1, "completed"), (2, "completed")]


# --- document forms and batch imports ---------------------------------------------


def qa_text(pairs: Sequence[tuple[str, str]]) -> str:
    return "\n\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)


def test_batch_import_into_a_qa_document(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    pairs = [
        (
            f"How does the {nonce} pipeline commit Kafka offsets?",
            "Only after side effects are durable.",
        ),
        (f"What does the {nonce} embedding cache key on?", "Provider, model and doc_hash."),
        (f"Where do {nonce} poison messages go?", "To the dead-letter topic with the error."),
    ]
    p.publish(created(ds, "faq", qa_text(pairs), 1, form=DocForm.QA, rule=ProcessRule()))
    p.wait_for(ds, ["faq"], min_version=1)
    assert_exact(p, ds, "faq", [q for q, _ in pairs])
    cache_before, mark = cache_count(p), env.spy.mark()

    extra = [
        ImportedSegment(
            content=f"Which {nonce} stage writes vectors to Milvus?", answer="load_vectors."
        ),
        ImportedSegment(
            content=f"How are {nonce} keyword postings stored?",
            answer="One row per keyword and segment.",
        ),
    ]
    job_id = f"job-{nonce}"
    p.publish(
        SegmentsBatchImported(
            dataset_id=ds, document_id="faq", job_id=job_id, segments=extra, version=1
        )
    )
    j = wait_job(p, job_id)
    assert (j["status"], j["total"], j["completed"], j["error"]) == ("completed", 2, 2, None)
    p.wait_for(ds, ["faq"], min_version=1)
    contents = [q for q, _ in pairs] + [s.content for s in extra]
    st = assert_exact(p, ds, "faq", contents)
    rows = ordered(seg_rows(p, ds, "faq"))
    assert [r.answer for r in rows] == [a for _, a in pairs] + [s.answer for s in extra]
    assert [r.job_id for r in rows] == [None, None, None, job_id, job_id]
    assert sorted(env.spy.since(mark)) == sorted(s.content for s in extra)
    assert cache_count(p) == cache_before + 2
    assert st.embedded_texts == 3 + 2

    # the question is what is searched, the answer comes back with it
    hits = search(p.container, ds, "which stage loads the vectors into milvus", "vector", 3)
    assert hits and hits[0].content == extra[0].content and hits[0].answer == "load_vectors."
    hits = search(p.container, ds, "where do poison messages end up", "hybrid", 3)
    assert hits[0].content == pairs[2][0] and hits[0].answer == pairs[2][1]

    # an update of the source keeps the imported segments after the split ones
    pairs2 = [*pairs[:2], (f"Who reads the {nonce} progress topic?", "track_status.")]
    p.publish(updated(ds, "faq", qa_text(pairs2), 2, form=DocForm.QA, rule=ProcessRule()))
    p.wait_for(ds, ["faq"], min_version=2)
    st = assert_exact(p, ds, "faq", [q for q, _ in pairs2] + [s.content for s in extra])
    assert (st.segments_added, st.segments_kept, st.segments_removed) == (1, 2, 1)


def test_batch_import_with_a_newer_version_counts_its_embeddings(
    env: Env, ds: str, nonce: str
) -> None:
    """Upstream versions grow with time: an import published after the create
    carries a newer version than the document's. Its work must still count."""
    p = env.pipeline
    pairs = [(f"What is {nonce} one?", "One."), (f"What is {nonce} two?", "Two.")]
    p.publish(created(ds, "faq", qa_text(pairs), 1, form=DocForm.QA, rule=ProcessRule()))
    p.wait_for(ds, ["faq"], min_version=1)
    job_id = f"job-{nonce}"
    extra = [ImportedSegment(content=f"What is {nonce} three?", answer="Three.")]
    mark = env.spy.mark()
    p.publish(
        SegmentsBatchImported(
            dataset_id=ds, document_id="faq", job_id=job_id, segments=extra, version=2
        )
    )
    j = wait_job(p, job_id)
    assert (j["status"], j["total"], j["completed"]) == ("completed", 1, 1)
    p.wait_for(ds, ["faq"])
    st = assert_exact(p, ds, "faq", [q for q, _ in pairs] + [extra[0].content])
    assert env.spy.since(mark) == [extra[0].content]
    assert st.embedded_texts == 3, "the import's embedding is missing from the document's count"


def test_batch_import_into_a_missing_document_fails_the_job(env: Env, ds: str) -> None:
    p = env.pipeline
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    p.publish(
        SegmentsBatchImported(
            dataset_id=ds,
            document_id="ghost",
            job_id=job_id,
            segments=[ImportedSegment(content="orphan question", answer="orphan answer")],
            version=1,
        )
    )
    j = wait_job(p, job_id)
    assert j["status"] == "error" and "does not exist" in j["error"]
    assert p.state(ds, "ghost") is None
    with p.container.uow(readonly=True) as uow:
        assert uow.segments.count(p.tenant, ds) == 0


def test_a_job_id_reused_in_another_dataset_leaves_the_first_job_alone(
    env: Env, ds: str, nonce: str
) -> None:
    """Issue 20 item 7: jobs were keyed by (tenant, job_id), so a failed import
    into another dataset under the same job id turned the first, completed
    job into `error`."""
    p = env.pipeline
    qa = qa_text([(f"Is {nonce} a question?", "It is.")])
    p.publish(created(ds, "faq", qa, 1, form=DocForm.QA, rule=ProcessRule()))
    p.wait_for(ds, ["faq"], min_version=1)
    job_id = f"reused-{nonce}"
    p.publish(
        SegmentsBatchImported(
            dataset_id=ds,
            document_id="faq",
            job_id=job_id,
            segments=[ImportedSegment(content=f"Is {nonce} imported?", answer="Yes.")],
            version=1,
        )
    )
    assert wait_job(p, job_id, ds)["status"] == "completed"
    other = f"{ds}-other"
    p.publish(
        SegmentsBatchImported(
            dataset_id=other,
            document_id="ghost",
            job_id=job_id,
            segments=[ImportedSegment(content="orphan question", answer="orphan answer")],
            version=1,
        )
    )
    failed = wait_job(p, job_id, other)
    assert failed["status"] == "error" and "does not exist" in failed["error"]
    first = job(p, job_id, ds)
    assert first is not None and (first["status"], first["error"]) == ("completed", None)
    # the CLI asks which one, and shows one when told
    proc = kb_cli(env, "status", "--job", job_id, "--json", check=False)
    assert proc.returncode != 0 and "several" in proc.stderr
    shown = json.loads(kb_cli(env, "status", "--job", job_id, "-d", ds, "--json").stdout)
    assert (shown["dataset_id"], shown["status"]) == (ds, "completed")


def _text_columns_holding(p: Pipeline, marker: str) -> list[str]:
    """Every table.column of the database whose text holds ``marker`` (text
    columns by LIKE, binary ones by reading them)."""
    from sqlalchemy import LargeBinary, String, Text

    from infra.db.models import Base

    found = []
    with p.container.database.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for col in table.columns:
                if isinstance(col.type, String | Text):
                    hit = conn.execute(select(col).where(col.like(f"%{marker}%")).limit(1)).first()
                elif isinstance(col.type, LargeBinary):
                    hit = next(
                        (v for (v,) in conn.execute(select(col)) if marker.encode() in bytes(v)),
                        None,
                    )
                else:
                    continue
                if hit is not None:
                    found.append(f"{table.name}.{col.name}")
    return found


def _cached(p: Pipeline, hashes: set[str]) -> set[str]:
    provider, model, _ = p.container.model_identity
    with p.container.uow(readonly=True) as uow:
        return set(uow.embeddings.get_many(p.tenant, provider, model, hashes))


def test_purge_leaves_no_text_of_a_deleted_document(env: Env, ds: str, nonce: str) -> None:
    """Issue 20 item 12: index, update, a failed import quoting a segment,
    delete, `kbstream purge`: no text of the document remains in any table,
    nor a cached vector of any of its texts; the tombstone still fences."""
    p = env.pipeline
    source = f"{nonce}-plans.txt"
    v1 = [paragraph(i, nonce) for i in range(3)]
    v2 = [paragraph(i, nonce, " revised") for i in range(3)]
    p.publish(created(ds, "doc", text_of(v1), 1).model_copy(update={"source": source}))
    p.wait_for(ds, ["doc"], min_version=1)
    p.publish(updated(ds, "doc", text_of(v2), 2).model_copy(update={"source": source}))
    p.wait_for(ds, ["doc"], min_version=2)
    job_id = f"purge-{uuid.uuid4().hex[:8]}"
    p.publish(
        SegmentsBatchImported(
            dataset_id=ds,
            document_id="doc",
            job_id=job_id,
            segments=[ImportedSegment(content=f"{nonce} " + "word " * 400)],  # too long
            version=2,
        )
    )
    assert nonce in wait_job(p, job_id, ds)["error"]  # the error quotes the segment
    p.publish(deleted(ds, "doc", 3))
    p.wait_for(ds, ["doc"], statuses=[IndexingStatus.DELETED], min_version=3)
    p.drain()
    assert_gone(p, ds, "doc")
    hashes_v1 = {compute_doc_hash(t) for t in v1}
    hashes_v2 = {compute_doc_hash(t) for t in v2}
    # the delete pruned the vectors of its last texts; an update prunes nothing
    assert _cached(p, hashes_v2) == set()
    assert _cached(p, hashes_v1) == hashes_v1
    assert sorted(_text_columns_holding(p, nonce)) == ["batch_jobs.error", "documents.source"]

    report = json.loads(kb_cli(env, "purge", "--dataset", ds, "--json").stdout)
    assert (report["documents"], report["pending"], report["jobs_removed"]) == (["doc"], [], 1)
    assert report["cache_entries_removed"] >= len(hashes_v1)
    assert _text_columns_holding(p, nonce) == []
    assert _cached(p, hashes_v1 | hashes_v2) == set()
    st = p.state(ds, "doc")
    assert st is not None and (st.status, st.version, st.source) == (IndexingStatus.DELETED, 3, "")
    # the tombstone still fences: a late create of an older version is dropped
    p.publish(created(ds, "doc", text_of(v1), 2))
    p.drain()
    assert_gone(p, ds, "doc")
    assert _text_columns_holding(p, nonce) == []


def test_parent_child_search_returns_the_parent(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    rule = ProcessRule(
        mode="custom", separator="\n\n", max_tokens=40, chunk_overlap=0, parent_max_tokens=400
    )
    parents = [
        f"The {nonce} parse stage reads the file a lifecycle event refers to. It extracts text "
        "from PDF, Word, HTML and Markdown. Large texts travel to the split stage by reference "
        "through the claim-check store, so no Kafka message exceeds the broker's size limit.",
        f"The {nonce} track_status stage joins the two indexing branches. A document is completed "
        "once every segment of its current version has its vector in Milvus and its keywords in "
        "the postings table. It reads flags rather than counting events, so duplicates cannot "
        "fool it.",
    ]
    p.publish(created(ds, "pc", text_of(parents), 1, form=DocForm.PARENT_CHILD, rule=rule))
    p.wait_for(ds, ["pc"], min_version=1)
    rows = ordered(seg_rows(p, ds, "pc"))
    assert len(rows) > len(parents), "every parent must split into several children"
    assert {r.parent for r in rows} == set(parents)
    for r in rows:
        assert r.parent is not None and r.content in r.parent
    snap = p.snapshot(ds, "pc")
    assert snap.segments == snap.vectors == snap.texts

    hits = search(p.container, ds, "message size limit of the broker, claim check", "vector", 3)
    assert hits and hits[0].parent == parents[0] and hits[0].content != parents[0]
    hits = search(p.container, ds, "duplicates cannot fool the completion check", "hybrid", 3)
    assert hits and hits[0].parent == parents[1]


# --- replay -------------------------------------------------------------------


def full_state(p: Pipeline, ds: str, docs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for doc in docs:
        snap = p.snapshot(ds, doc)
        st = snap.state
        rows = seg_rows(p, ds, doc)
        out[doc] = {
            "segments": snap.segments,
            "vectors": snap.vectors,
            "texts": snap.texts,
            "rows": {
                n: (r.position, r.doc_hash, r.content, r.answer, r.parent, r.job_id)
                for n, r in rows.items()
            },
            "state": None
            if st is None
            else (st.version, st.status, st.segment_count, st.embedded_texts, st.error),
        }
    out["milvus_duplicates"] = milvus_duplicates(p, ds)
    out["vector_count"] = p.container.vectors.count(p.tenant, ds)
    out["keyword_count"] = p.container.keyword_index.count(p.tenant, ds)
    return out


def publish_and_settle(p: Pipeline, ds: str, events: Sequence[Event]) -> None:
    """One at a time, each settled, as upstream would have sent them."""
    for e in events:
        p.publish(e)
        if isinstance(e, DocumentDeleted):
            p.wait_for(ds, [e.document_id], [IndexingStatus.DELETED], min_version=e.version)
            continue
        if isinstance(e, SegmentsBatchImported):
            wait_job(p, e.job_id)
        elif isinstance(e, SegmentDeleted):
            wait_until(
                lambda g=e.index_node_id, d=e.document_id: g not in p.snapshot(ds, d).segments,
                what="segment gone",
            )
        else:
            p.wait_for(ds, [e.document_id], min_version=e.version)
        p.wait_for(ds, [e.document_id])
    p.drain()


def test_replaying_every_event_changes_nothing(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    a1 = [paragraph(i, nonce) for i in range(8)]
    a2 = [*a1[:4], paragraph(4, nonce, " edited"), *a1[5:]]
    qa = [(f"What is {nonce} question {i}?", f"Answer number {i}.") for i in range(3)]
    events: list[Event] = [
        created(ds, "a", text_of(a1), 1),
        created(ds, "b", text_of([paragraph(20, nonce), paragraph(21, nonce)]), 1),
        created(ds, "faq", qa_text(qa), 1, form=DocForm.QA, rule=ProcessRule()),
        updated(ds, "a", text_of(a2), 2),
        deleted(ds, "b", 2),
        SegmentsBatchImported(
            dataset_id=ds,
            document_id="faq",
            job_id=f"replay-{nonce}",
            segments=[ImportedSegment(content=f"Imported {nonce} question?", answer="Yes.")],
            version=1,
        ),
    ]
    publish_and_settle(p, ds, events)
    docs = ["a", "b", "faq"]
    before = full_state(p, ds, docs)
    assert before["a"]["state"][:3] == (2, IndexingStatus.COMPLETED, 8)
    assert before["b"]["state"][:3] == (2, IndexingStatus.DELETED, 0)
    assert before["faq"]["state"][:3] == (1, IndexingStatus.COMPLETED, 4)
    cache_before, mark = cache_count(p), env.spy.mark()
    hits_before = {d: p.state(ds, d).cache_hits for d in docs}  # type: ignore[union-attr]

    p.publish(*events)  # every upstream event a second time, same ids and versions
    p.drain()
    p.wait_for(ds, ["a", "faq"], min_version=1)
    p.wait_for(ds, ["b"], [IndexingStatus.DELETED], min_version=2)

    assert full_state(p, ds, docs) == before
    assert env.spy.since(mark) == [], "a replay must send nothing to the model"
    assert env.spy.writes_since(mark) == (set(), set()), "nor write a vector or a posting"
    assert cache_count(p) == cache_before
    assert {d: p.state(ds, d).cache_hits for d in docs} == hits_before  # type: ignore[union-attr]
    j = job(p, f"replay-{nonce}")
    assert j is not None and (j["status"], j["completed"], j["total"]) == ("completed", 1, 1)


def keep_embed_busy(p: Pipeline, ds: str, nonce: str, n: int = 150) -> None:
    """Give the embed stage seconds of model work (n new texts), so that split
    handles the next events long before embed sees their segments."""
    p.publish(created(ds, "busy", text_of([paragraph(i, nonce, " busy") for i in range(n)]), 1))
    wait_until(
        lambda: (st := p.state(ds, "busy")) is not None and st.status is IndexingStatus.INDEXING,
        what="the busy document reaching the embed stage",
    )


STUCK = (
    "BUG: a segment.deleted that removes the last segment still pending indexing "
    "leaves the document in 'indexing' forever: embed and index_keywords emit no "
    "progress event for a split whose segments are gone, and split's segment delete "
    "never re-checks completion (consumers/split.py SplitStage._delete_segment)"
)


def test_segment_deleted_while_its_document_is_indexing(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    v1 = [paragraph(i, nonce) for i in range(3)]
    p.publish(created(ds, "doc", text_of(v1), 1))
    p.wait_for(ds, ["doc"], min_version=1)
    late = paragraph(9, nonce, " late")
    late_id = make_index_node_id(ds, "doc", compute_doc_hash(late))
    keep_embed_busy(p, ds, nonce)
    p.publish(
        updated(ds, "doc", text_of([*v1, late]), 2),
        SegmentDeleted(dataset_id=ds, document_id="doc", index_node_id=late_id, version=2),
    )
    wait_until(
        lambda: (
            (st := p.state(ds, "doc")) is not None
            and st.version == 2
            and st.status not in (IndexingStatus.PARSING, IndexingStatus.SPLITTING)
        ),
        what="the update split",
    )
    p.wait_for(ds, ["busy"], min_version=1)
    p.wait_for(ds, ["doc"], min_version=2, timeout=10)
    assert_exact(p, ds, "doc", v1)


def test_replaying_an_update_and_a_segment_delete_changes_nothing(
    env: Env, ds: str, nonce: str
) -> None:
    p = env.pipeline
    a1 = [paragraph(i, nonce) for i in range(5)]
    a2 = [*a1[:4], paragraph(4, nonce, " edited")]
    events: list[Event] = [created(ds, "a", text_of(a1), 1), updated(ds, "a", text_of(a2), 2)]
    publish_and_settle(p, ds, events)
    victim = ordered(seg_rows(p, ds, "a"))[2]
    events.append(
        SegmentDeleted(
            dataset_id=ds, document_id="a", index_node_id=victim.index_node_id, version=2
        )
    )
    publish_and_settle(p, ds, events[-1:])
    before = full_state(p, ds, ["a"])
    assert before["a"]["state"][:3] == (2, IndexingStatus.COMPLETED, 4)

    keep_embed_busy(p, ds, nonce)
    mark = env.spy.mark()
    p.publish(*events)  # the replayed update brings the victim back, its delete removes it
    p.wait_for(ds, ["busy"], min_version=1)
    p.wait_for(ds, ["a"], min_version=2, timeout=10)
    p.drain()
    after = full_state(p, ds, ["a"])
    # the busy document shares the dataset: compare document a's own state
    assert after["a"] == before["a"]
    assert after["milvus_duplicates"] == before["milvus_duplicates"]
    assert [t for t in env.spy.since(mark) if "busy" not in t] == []


# --- sync (index_paths) with cleanup modes ---------------------------------------


def expected_ids(p: Pipeline, ds: str, doc: str, text: str) -> set[str]:
    """The index_node_ids the domain gives this text with the automatic rule."""
    tokens = p.container.token_counter
    chunks = split_document(text, DocForm.TEXT, ProcessRule(), tokens, tokens.max_input_tokens)
    return {s.index_node_id for s in build_segments(ds, doc, chunks)}


def test_sync_with_cleanup_modes(env: Env, ds: str, nonce: str) -> None:
    from producers.files import document_id_for

    p = env.pipeline
    folder = env.home / f"sync-{nonce}"
    folder.mkdir()
    texts = {
        "a.txt": [paragraph(i, nonce) for i in range(6)],
        "b.txt": [paragraph(i, nonce, " beta") for i in range(3)],
        "c.txt": [paragraph(i, nonce, " gamma") for i in range(2)],
    }
    for name, paras in texts.items():
        (folder / name).write_text(text_of(paras))
    ids = {name: document_id_for(p.tenant, ds, folder / name) for name in texts}

    def sync(cleanup: str) -> dict[str, Any]:
        return index_paths(p.container, [folder], ds, cleanup=cleanup, timeout=120).to_dict()  # type: ignore[arg-type]

    def rows(name: str) -> set[str]:
        return set(seg_rows(p, ds, ids[name]))

    def expect(name: str, paras: Sequence[str]) -> set[str]:
        return expected_ids(p, ds, ids[name], text_of(paras))

    mark = env.spy.mark()
    s = sync("incremental")
    want = {name: expect(name, paras) for name, paras in texts.items()}
    n = sum(len(w) for w in want.values())
    assert (s["added"], s["updated"], s["skipped"], s["deleted"], s["failed"]) == (3, 0, 0, 0, 0)
    assert (s["segments"], s["segments_added"], s["segments_kept"], s["segments_removed"]) == (
        n,
        n,
        0,
        0,
    )
    assert s["embedded"] == n == len(env.spy.since(mark))
    for name in texts:
        assert rows(name) == want[name]

    s = sync("incremental")  # nothing changed: nothing published, nothing embedded
    assert (s["published"], s["skipped"], s["embedded"]) == (0, 3, 0)

    # cleanup=none: a changed file adds its new segments and keeps the vanished
    # ones; a vanished file stays indexed
    before = rows("a.txt")
    a2 = [*texts["a.txt"][:5], paragraph(5, nonce, " rewritten")]
    (folder / "a.txt").write_text(text_of(a2))
    (folder / "c.txt").unlink()
    split = expect("a.txt", a2)
    mark = env.spy.mark()
    s = sync("none")
    assert (s["added"], s["updated"], s["skipped"], s["deleted"]) == (0, 1, 1, 0)
    added, kept = len(split - before), len(split & before)
    assert 0 < added < len(split)
    assert (s["segments_added"], s["segments_kept"], s["segments_removed"]) == (added, kept, 0)
    assert s["embedded"] == added == len(env.spy.since(mark))
    assert rows("a.txt") == before | split, "cleanup=none must not delete a segment"
    assert p.state(ds, ids["c.txt"]).status is IndexingStatus.COMPLETED  # type: ignore[union-attr]
    snap = p.snapshot(ds, ids["a.txt"])
    assert snap.segments == snap.vectors == snap.texts

    # incremental: a changed file's vanished segments go, the ones none kept too
    before = rows("a.txt")
    a3 = [*a2[:4], paragraph(4, nonce, " rewritten"), a2[5]]
    (folder / "a.txt").write_text(text_of(a3))
    split = expect("a.txt", a3)
    mark = env.spy.mark()
    s = sync("incremental")
    assert (s["added"], s["updated"], s["skipped"], s["deleted"]) == (0, 1, 1, 0)
    added, kept, removed = len(split - before), len(split & before), len(before - split)
    assert (s["segments_added"], s["segments_kept"], s["segments_removed"]) == (
        added,
        kept,
        removed,
    )
    assert s["embedded"] == added == len(env.spy.since(mark))
    assert rows("a.txt") == split
    assert p.state(ds, ids["c.txt"]).status is IndexingStatus.COMPLETED  # type: ignore[union-attr]

    # full: the vanished file's document goes, everywhere
    s = sync("full")
    assert (s["published"], s["skipped"], s["deleted"]) == (1, 2, 1)
    assert (s["segments_removed"], s["embedded"]) == (len(want["c.txt"]), 0)
    p.drain()
    assert_gone(p, ds, ids["c.txt"])
    for name in ("a.txt", "b.txt"):
        snap = p.snapshot(ds, ids[name])
        assert snap.segments == snap.vectors == snap.texts == rows(name) != set()
    assert not milvus_duplicates(p, ds)
    s = sync("full")  # and then there is nothing left to do
    assert (s["published"], s["skipped"], s["deleted"], s["embedded"]) == (0, 2, 0, 0)


def test_incremental_sync_cleans_what_a_none_sync_kept(env: Env, ds: str, nonce: str) -> None:
    p = env.pipeline
    folder = env.home / f"sync2-{nonce}"
    folder.mkdir()
    f = folder / "a.txt"
    v1 = [paragraph(i, nonce) for i in range(3)]
    f.write_text(text_of(v1))
    index_paths(p.container, [folder], ds, cleanup="incremental", timeout=120)
    v2 = [paragraph(i, nonce, " two") for i in range(3)]
    f.write_text(text_of(v2))
    index_paths(p.container, [folder], ds, cleanup="none", timeout=120)
    s = index_paths(p.container, [folder], ds, cleanup="incremental", timeout=120)
    from producers.files import document_id_for

    rows = seg_rows(p, ds, document_id_for(p.tenant, ds, f))
    assert s.segments_removed >= 1
    assert all(r.content in text_of(v2) for r in rows.values()), "stale segments survived"


# --- the CLI against the same database ------------------------------------------


def kb_cli(env: Env, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KBSTREAM_")}
    e.update(
        HF_HUB_OFFLINE="1",
        KBSTREAM_DATABASE_URL=env.db_url,
        KBSTREAM_HOME=str(env.home / "cli"),
        KBSTREAM_TENANT=env.pipeline.tenant,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kbstream.cli", *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kbstream {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture
def imported(env: Env, ds: str, nonce: str) -> dict[str, str]:
    p = env.pipeline
    doc = f"faq-{nonce}"  # unique across datasets: the CLI may look it up by id alone
    qa = qa_text([(f"Is {nonce} a question?", "It is.")])
    p.publish(created(ds, doc, qa, 1, form=DocForm.QA, rule=ProcessRule()))
    p.wait_for(ds, [doc], min_version=1)
    job_id = f"cli-{nonce}"
    p.publish(
        SegmentsBatchImported(
            dataset_id=ds,
            document_id=doc,
            job_id=job_id,
            segments=[ImportedSegment(content=f"Is {nonce} imported?", answer="Yes.")],
            version=1,
        )
    )
    wait_job(p, job_id)
    p.wait_for(ds, [doc], min_version=1)
    bad = f"cli-bad-{nonce}"
    p.publish(
        SegmentsBatchImported(
            dataset_id=ds,
            document_id="missing",
            job_id=bad,
            segments=[ImportedSegment(content="q", answer="a")],
            version=1,
        )
    )
    wait_job(p, bad)
    return {"ds": ds, "doc": doc, "job": job_id, "bad_job": bad}


def test_cli_status_of_a_job_and_a_document(env: Env, imported: dict[str, str]) -> None:
    j = json.loads(kb_cli(env, "status", "--job", imported["job"], "--json").stdout)
    assert (j["job_id"], j["status"], j["total"], j["completed"]) == (
        imported["job"],
        "completed",
        1,
        1,
    )
    assert j["error"] is None and j["document_id"] == imported["doc"]
    bad = json.loads(kb_cli(env, "status", "--job", imported["bad_job"], "--json").stdout)
    assert bad["status"] == "error" and "does not exist" in bad["error"]
    proc = kb_cli(env, "status", "--job", "no-such-job", "--json", check=False)
    assert proc.returncode == 1

    d = json.loads(
        kb_cli(
            env, "status", "--dataset", imported["ds"], "--document", imported["doc"], "--json"
        ).stdout
    )
    assert d["document_id"] == imported["doc"] and d["status"] == "completed"
    assert d["segments"] == 2 and d["version"] == 1
    assert {"embedded", "cache_hits", "segments_added", "segments_kept", "segments_removed"} <= (
        d.keys()
    )


def test_cli_status_of_a_document_by_id_alone(env: Env, imported: dict[str, str]) -> None:
    """The issue's form: `kbstream status --document ID --json`, no --dataset."""
    d = json.loads(kb_cli(env, "status", "--document", imported["doc"], "--json").stdout)
    assert d["document_id"] == imported["doc"] and d["status"] == "completed"
