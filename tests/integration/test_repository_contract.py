"""The repository contract, run against SQLite and a real PostgreSQL alike (the
``database`` fixture is parametrized over both): versions, segment sets, the
embedding cache, keyword postings, the claim-check store, migrations, and
connection loss surfacing as TransientError."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select, text

from domain.documents import IndexingStatus
from domain.errors import TransientError
from domain.model import ChunkText, Segment, build_segments, diff_segments
from infra.db.engine import create_db_engine, migrate
from infra.db.models import DatasetRow, DocumentRow, EmbeddingRow, KeywordPostingRow
from infra.db.repository import Database, DocKey

pytestmark = pytest.mark.integration

KEY = DocKey("tenant-a", "ds_1", "doc-1")
CLOSED_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:1/x"


def begin(db: Database, version: int, key: DocKey = KEY, source: str = "a.txt") -> Any:
    return db.documents.begin_parsing(key, version, source, "text", "hash", "text/plain")


def segs(*texts: str, key: DocKey = KEY) -> list[Segment]:
    return build_segments(
        key.dataset_id, key.document_id, [ChunkText(t, tokens=len(t.split())) for t in texts]
    )


def split(db: Database, version: int, texts: Sequence[str], key: DocKey = KEY) -> Any:
    new = segs(*texts, key=key)
    diff = diff_segments(db.segments.existing(key), new)
    return db.documents.apply_split(key, version, new, diff, chars=sum(map(len, texts)))


def mark_indexed(db: Database, ids: Sequence[str]) -> None:
    db.segments.mark("vector_indexed", ids)
    db.segments.mark("keywords_indexed", ids)


def scalar(db: Database, query: Any) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(query).scalar_one()


# --- documents and versions -------------------------------------------------------


class TestBeginParsing:
    def test_creates_document_and_dataset(self, database: Database) -> None:
        state = begin(database, 5)
        assert state is not None
        assert (state.tenant_id, state.dataset_id, state.document_id) == (
            "tenant-a",
            "ds_1",
            "doc-1",
        )
        assert state.version == 5
        assert state.status is IndexingStatus.PARSING
        assert state.source == "a.txt"
        assert state.content_hash == "hash"
        assert state.error is None
        assert database.documents.get(KEY) == state

        begin(database, 1, DocKey("tenant-a", "ds_1", "doc-2"))
        begin(database, 1, DocKey("tenant-b", "ds_1", "doc-1"))
        datasets = select(func.count()).select_from(DatasetRow)
        assert scalar(database, datasets) == 2  # (a, ds_1) once, (b, ds_1)
        assert scalar(database, select(func.count()).select_from(DocumentRow)) == 3

    def test_newer_version_wins(self, database: Database) -> None:
        begin(database, 1)
        database.documents.set_status(KEY, 1, IndexingStatus.ERROR, "old failure")
        state = begin(database, 2, source="renamed.txt")
        assert state is not None
        assert state.version == 2
        assert state.status is IndexingStatus.PARSING
        assert state.source == "renamed.txt"
        assert state.error is None  # a new version starts clean
        assert scalar(database, select(func.count()).select_from(DocumentRow)) == 1

    def test_older_version_is_stale(self, database: Database) -> None:
        begin(database, 10)
        assert begin(database, 9, source="stale.txt") is None
        state = database.documents.get(KEY)
        assert state is not None
        assert state.version == 10
        assert state.source == "a.txt"

    def test_redelivered_same_version_is_claimed_again(self, database: Database) -> None:
        begin(database, 3)
        database.documents.set_status(KEY, 3, IndexingStatus.SPLITTING)
        again = begin(database, 3)
        assert again is not None
        assert again.version == 3
        assert again.status is IndexingStatus.PARSING

    def test_deleted_blocks_equal_and_older_versions(self, database: Database) -> None:
        begin(database, 5)
        assert database.documents.set_status(KEY, 5, IndexingStatus.DELETED)
        assert begin(database, 5) is None
        assert begin(database, 4) is None
        state = database.documents.get(KEY)
        assert state is not None
        assert state.status is IndexingStatus.DELETED
        # a newer create after the delete brings the document back
        revived = begin(database, 6)
        assert revived is not None
        assert revived.status is IndexingStatus.PARSING

    def test_versions_lookup(self, database: Database) -> None:
        other = DocKey("tenant-a", "ds_1", "doc-2")
        begin(database, 1)
        begin(database, 7, other)
        found = database.documents.versions([KEY, other, DocKey("x", "y", "z"), KEY])
        assert {k: s.version for k, s in found.items()} == {KEY: 1, other: 7}
        assert database.documents.versions([]) == {}


class TestSetStatus:
    def test_only_the_current_version_moves(self, database: Database) -> None:
        begin(database, 1)
        begin(database, 2)
        assert not database.documents.set_status(KEY, 1, IndexingStatus.ERROR, "late failure")
        state = database.documents.get(KEY)
        assert state is not None
        assert state.status is IndexingStatus.PARSING
        assert state.error is None

        assert database.documents.set_status(KEY, 2, IndexingStatus.SPLITTING, chars=42)
        state = database.documents.get(KEY)
        assert state is not None
        assert state.status is IndexingStatus.SPLITTING
        assert scalar(database, select(DocumentRow.chars)) == 42

    def test_error_records_reason(self, database: Database) -> None:
        begin(database, 1)
        assert database.documents.set_status(KEY, 1, IndexingStatus.ERROR, "x" * 5000)
        state = database.documents.get(KEY)
        assert state is not None
        assert state.status is IndexingStatus.ERROR
        assert state.error == "x" * 4000

    def test_unknown_document_and_deleted_document(self, database: Database) -> None:
        assert not database.documents.set_status(KEY, 1, IndexingStatus.SPLITTING)
        begin(database, 1)
        database.documents.set_status(KEY, 1, IndexingStatus.DELETED)
        assert not database.documents.set_status(KEY, 1, IndexingStatus.COMPLETED)
        state = database.documents.get(KEY)
        assert state is not None
        assert state.status is IndexingStatus.DELETED


# --- segments --------------------------------------------------------------------


class TestApplySplit:
    def test_first_split_inserts_segments_and_counts(self, database: Database) -> None:
        begin(database, 1)
        state = split(database, 1, ["alpha one", "beta two three", "知识库"])
        assert state is not None
        assert state.status is IndexingStatus.INDEXING
        assert state.segment_count == 3
        assert (state.segments_added, state.segments_kept, state.segments_removed) == (3, 0, 0)
        assert scalar(database, select(DocumentRow.tokens)) == 2 + 3 + 1
        assert scalar(database, select(DocumentRow.word_count)) == 2 + 3 + 3
        ex = database.segments.existing(KEY)
        assert sorted(e.position for e in ex) == [0, 1, 2]
        assert not any(e.indexed for e in ex)
        assert database.segments.count("tenant-a", "ds_1") == 3

    def test_update_inserts_keeps_repositions_and_removes(self, database: Database) -> None:
        begin(database, 1)
        split(database, 1, ["a", "b", "c"])
        v1 = {s.content: s.index_node_id for s in segs("a", "b", "c")}
        mark_indexed(database, [v1["a"], v1["b"]])  # c never finished

        begin(database, 2)
        state = split(database, 2, ["b", "new", "c"])
        assert state is not None
        assert state.status is IndexingStatus.INDEXING
        assert state.segment_count == 3
        # new added; b and c kept (c re-indexed); a removed
        assert (state.segments_added, state.segments_kept, state.segments_removed) == (1, 2, 1)

        v2 = {s.content: s.index_node_id for s in segs("b", "new", "c")}
        rows = database.segments.by_ids([*v1.values(), v2["new"]])
        assert v1["a"] not in rows
        assert rows[v2["b"]].position == 0
        assert rows[v2["b"]].vector_indexed  # kept as is, not re-indexed
        assert rows[v2["new"]].position == 1
        assert rows[v2["new"]].version == 2
        assert rows[v2["c"]].position == 2
        assert rows[v2["c"]].version == 2
        assert rows[v2["c"]].status == "indexing"
        assert rows[v2["b"]].source == "a.txt"
        assert database.segments.count("tenant-a", "ds_1") == 3

    def test_nothing_to_index_completes_at_once(self, database: Database) -> None:
        begin(database, 1)
        split(database, 1, ["a", "b"])
        mark_indexed(database, [s.index_node_id for s in segs("a", "b")])
        begin(database, 2)
        state = split(database, 2, ["b", "a"])
        assert state is not None
        assert state.status is IndexingStatus.COMPLETED
        assert state.completed_at is not None
        assert (state.segments_added, state.segments_kept, state.segments_removed) == (0, 2, 0)
        positions = {e.index_node_id: e.position for e in database.segments.existing(KEY)}
        assert positions == {s.index_node_id: s.position for s in segs("b", "a")}

    def test_stale_or_deleted_version_is_refused(self, database: Database) -> None:
        begin(database, 1)
        begin(database, 2)
        assert split(database, 1, ["a"]) is None
        assert database.segments.existing(KEY) == []
        database.documents.set_status(KEY, 2, IndexingStatus.DELETED)
        assert split(database, 2, ["a"]) is None
        assert split(database, 2, ["a"], key=DocKey("t", "d", "unknown")) is None

    def test_identical_content_in_two_documents_gets_two_rows(self, database: Database) -> None:
        other = DocKey("tenant-a", "ds_1", "doc-2")
        begin(database, 1)
        begin(database, 1, other)
        split(database, 1, ["shared paragraph"])
        split(database, 1, ["shared paragraph"], key=other)
        assert database.segments.count("tenant-a", "ds_1") == 2
        assert set(database.segments.ids_for_dataset("tenant-a", "ds_1").values()) == {
            "doc-1",
            "doc-2",
        }

    def test_replayed_split_is_idempotent(self, database: Database) -> None:
        begin(database, 1)
        new = segs("a", "b")
        diff = diff_segments([], new)
        database.documents.apply_split(KEY, 1, new, diff, chars=2)
        state = database.documents.apply_split(KEY, 1, new, diff, chars=2)
        assert state is not None
        assert database.segments.count("tenant-a", "ds_1") == 2


class TestTryComplete:
    def test_needs_both_flags_on_every_segment(self, database: Database) -> None:
        begin(database, 1)
        split(database, 1, ["a", "b"])
        a, b = (s.index_node_id for s in segs("a", "b"))
        assert database.documents.try_complete(KEY, 1) is IndexingStatus.INDEXING

        assert database.segments.mark("vector_indexed", [a, b, a]) == 2
        assert database.documents.try_complete(KEY, 1) is IndexingStatus.INDEXING
        database.segments.mark("keywords_indexed", [a])
        assert database.documents.try_complete(KEY, 1) is IndexingStatus.INDEXING
        state = database.documents.get(KEY)
        assert state is not None
        assert state.status is IndexingStatus.INDEXING

        database.segments.mark("keywords_indexed", [b])
        assert database.documents.try_complete(KEY, 1) is IndexingStatus.COMPLETED
        state = database.documents.get(KEY)
        assert state is not None
        assert state.status is IndexingStatus.COMPLETED
        assert state.completed_at is not None
        assert {r.status for r in database.segments.by_ids([a, b]).values()} == {"completed"}
        # repeated (a redelivered event) is harmless
        assert database.documents.try_complete(KEY, 1) is IndexingStatus.COMPLETED

    def test_keywords_alone_are_not_enough(self, database: Database) -> None:
        begin(database, 1)
        split(database, 1, ["a"])
        database.segments.mark("keywords_indexed", [segs("a")[0].index_node_id])
        assert database.documents.try_complete(KEY, 1) is IndexingStatus.INDEXING

    def test_other_version_is_ignored(self, database: Database) -> None:
        begin(database, 1)
        split(database, 1, ["a"])
        mark_indexed(database, [segs("a")[0].index_node_id])
        assert database.documents.try_complete(KEY, 2) is None
        assert database.documents.try_complete(KEY, 0) is None
        assert database.documents.try_complete(DocKey("t", "d", "none"), 1) is None
        state = database.documents.get(KEY)
        assert state is not None
        assert state.status is IndexingStatus.INDEXING

    def test_unmarking_keeps_document_indexing(self, database: Database) -> None:
        begin(database, 1)
        split(database, 1, ["a"])
        node = segs("a")[0].index_node_id
        mark_indexed(database, [node])
        database.segments.mark("vector_indexed", [node], value=False)
        assert database.documents.try_complete(KEY, 1) is IndexingStatus.INDEXING


# --- embedding cache --------------------------------------------------------------


class TestEmbeddingCache:
    def test_round_trip_is_exact_float32_bytes(self, database: Database) -> None:
        rng = np.random.default_rng(0)
        vectors = {
            "h1": rng.standard_normal(384).tolist(),  # float64 in, float32 stored
            "h2": [0.1, -0.0, 1e-45, 3.4028235e38, -1.5],
            "h3": np.linspace(-1, 1, 16, dtype=np.float32),
        }
        database.embeddings.put_many("prov", "model-x", vectors)
        got = database.embeddings.get_many("prov", "model-x", ["h1", "h2", "h3", "missing"])
        assert set(got) == {"h1", "h2", "h3"}
        for h, v in vectors.items():
            expected = np.asarray(v, dtype="<f4")
            assert got[h].dtype == np.dtype("<f4")
            assert got[h].shape == expected.shape
            assert got[h].tobytes() == expected.tobytes()

        with database.engine.connect() as conn:
            dim, blob = conn.execute(
                select(EmbeddingRow.dim, EmbeddingRow.vector).where(EmbeddingRow.doc_hash == "h1")
            ).one()
        blob = bytes(blob)
        assert dim == 384
        assert len(blob) == 384 * 4  # plain little-endian float32, no framing
        assert blob == np.asarray(vectors["h1"], dtype="<f4").tobytes()
        assert not blob.startswith(b"\x80")  # not a pickle
        with pytest.raises(pickle.UnpicklingError):
            pickle.loads(blob)

    def test_keyed_by_provider_and_model(self, database: Database) -> None:
        database.embeddings.put_many("prov", "m1", {"h": [1.0, 2.0]})
        database.embeddings.put_many("prov", "m2", {"h": [3.0, 4.0]})
        database.embeddings.put_many("other", "m1", {"h": [5.0, 6.0]})
        assert database.embeddings.get_many("prov", "m1", ["h"])["h"].tolist() == [1.0, 2.0]
        assert database.embeddings.get_many("prov", "m2", ["h"])["h"].tolist() == [3.0, 4.0]
        assert database.embeddings.get_many("other", "m1", ["h"])["h"].tolist() == [5.0, 6.0]
        assert database.embeddings.get_many("nobody", "m1", ["h"]) == {}
        assert database.embeddings.count() == 3
        assert database.embeddings.count("prov") == 2
        assert database.embeddings.count("prov", "m1") == 1

    def test_existing_key_is_ignored(self, database: Database) -> None:
        database.embeddings.put_many("p", "m", {"h": [1.0, 2.0], "g": [0.5, 0.5]})
        database.embeddings.put_many("p", "m", {"h": [9.0, 9.0], "k": [7.0, 7.0]})
        got = database.embeddings.get_many("p", "m", ["h", "g", "k"])
        assert got["h"].tolist() == [1.0, 2.0]  # first write wins, no error
        assert got["k"].tolist() == [7.0, 7.0]
        assert database.embeddings.count("p", "m") == 3

    def test_concurrent_writers_with_overlapping_keys(self, database: Database) -> None:
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def writer(i: int) -> None:
            try:
                start.wait(timeout=10)
                for round_ in range(3):
                    keys = [f"h{j:03d}" for j in range(i * 20, i * 20 + 60)]  # overlaps
                    database.embeddings.put_many(
                        "p", "m", {k: [float(i), float(round_)] for k in reversed(keys)}
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert database.embeddings.count("p", "m") == 120  # h000..h119, one row each
        rows = scalar(
            database,
            select(func.count(func.distinct(EmbeddingRow.doc_hash))).where(
                EmbeddingRow.provider == "p"
            ),
        )
        assert rows == 120
        assert len(database.embeddings.get_many("p", "m", [f"h{j:03d}" for j in range(120)])) == 120

    def test_many_keys_past_the_chunk_size(self, database: Database) -> None:
        vectors = {f"{i:064x}": [float(i)] * 4 for i in range(1200)}
        database.embeddings.put_many("p", "m", vectors)
        got = database.embeddings.get_many("p", "m", list(vectors))
        assert len(got) == 1200
        assert got[f"{1199:064x}"].tolist() == [1199.0] * 4


# --- keyword postings -------------------------------------------------------------

POSTINGS: dict[tuple[str, str], list[tuple[str, float]]] = {
    ("n1", "doc-1"): [("kafka", 0.5), ("stream", 0.2)],
    ("n2", "doc-1"): [("kafka", 0.9)],
    ("n3", "doc-2"): [("stream", 1.0), ("kafka", 0.1), ("知识库", 0.7)],
}


class TestKeywordPostings:
    def test_replace_is_idempotent(self, database: Database) -> None:
        database.postings.replace("t", "d", POSTINGS)
        assert database.postings.count("t", "d") == 6
        database.postings.replace("t", "d", POSTINGS)
        assert database.postings.count("t", "d") == 6
        assert database.postings.nodes("t", "d") == {"n1": 2, "n2": 1, "n3": 3}

    def test_replace_swaps_a_nodes_keywords(self, database: Database) -> None:
        database.postings.replace("t", "d", POSTINGS)
        database.postings.replace("t", "d", {("n1", "doc-1"): [("milvus", 0.4)]})
        assert database.postings.nodes("t", "d") == {"n1": 1, "n2": 1, "n3": 3}
        assert [n for n, _ in database.postings.search("t", "d", {"stream": 1.0}, 10)] == ["n3"]
        assert database.postings.search("t", "d", {"milvus": 1.0}, 10) == [
            ("n1", pytest.approx(0.4))
        ]

    def test_search_ranks_by_summed_weights(self, database: Database) -> None:
        database.postings.replace("t", "d", POSTINGS)
        hits = database.postings.search("t", "d", {"kafka": 1.0, "stream": 1.0}, 10)
        assert [n for n, _ in hits] == ["n3", "n2", "n1"]
        assert [s for _, s in hits] == pytest.approx([1.1, 0.9, 0.7])

        hits = database.postings.search("t", "d", {"kafka": 2.0, "stream": 0.5}, 2)
        assert hits == [("n2", pytest.approx(1.8)), ("n1", pytest.approx(1.1))]
        assert database.postings.search("t", "d", {"知识库": 1.0}, 5) == [
            ("n3", pytest.approx(0.7))
        ]
        assert database.postings.search("t", "d", {"absent": 1.0}, 5) == []
        assert database.postings.search("t", "d", {}, 5) == []

    def test_isolated_by_tenant_and_dataset(self, database: Database) -> None:
        database.postings.replace("t", "d", POSTINGS)
        database.postings.replace("t2", "d", {("x1", "doc-1"): [("kafka", 5.0)]})
        database.postings.replace("t", "d2", {("x2", "doc-1"): [("kafka", 6.0)]})
        hits = database.postings.search("t", "d", {"kafka": 1.0}, 10)
        assert [n for n, _ in hits] == ["n2", "n1", "n3"]
        assert [n for n, _ in database.postings.search("t2", "d", {"kafka": 1.0}, 10)] == ["x1"]
        assert [n for n, _ in database.postings.search("t", "d2", {"kafka": 1.0}, 10)] == ["x2"]
        assert database.postings.count("t", "d") == 6
        assert database.postings.count("t2", "d") == 1

    def test_delete_nodes(self, database: Database) -> None:
        database.postings.replace("t", "d", POSTINGS)
        assert database.postings.delete_nodes(["n1", "n3", "n1", "missing"]) == 5
        assert database.postings.nodes("t", "d") == {"n2": 1}
        assert database.postings.delete_nodes([]) == 0
        assert database.postings.delete_nodes(["n1"]) == 0

    def test_rows_are_one_per_posting(self, database: Database) -> None:
        database.postings.replace("t", "d", POSTINGS)
        with database.engine.connect() as conn:
            rows = conn.execute(
                select(KeywordPostingRow.keyword, KeywordPostingRow.document_id).where(
                    KeywordPostingRow.index_node_id == "n3"
                )
            ).all()
        assert sorted(rows) == sorted(
            [("stream", "doc-2"), ("kafka", "doc-2"), ("知识库", "doc-2")]
        )


# --- claim-check store ------------------------------------------------------------


class TestClaimCheck:
    def test_put_get(self, database: Database) -> None:
        data = bytes(range(256)) * 4
        database.payloads.put("parsed/t/d/doc-1/1", data)
        got = database.payloads.get("parsed/t/d/doc-1/1")
        assert got == data
        assert isinstance(got, bytes)
        assert database.payloads.get("parsed/t/d/doc-1/2") is None

    def test_put_same_key_overwrites(self, database: Database) -> None:
        database.payloads.put("k", b"one")
        database.payloads.put("k", b"two")
        assert database.payloads.get("k") == b"two"

    def test_large_payload(self, database: Database) -> None:
        data = np.random.default_rng(1).bytes(8 * 1024 * 1024)
        database.payloads.put("big", data)
        assert database.payloads.get("big") == data

    def test_replace_prefix_drops_older_versions_of_the_same_document(
        self, database: Database
    ) -> None:
        database.payloads.put("parsed/t/d/doc1/1", b"v1")
        database.payloads.put("parsed/t/d/doc1/2", b"v2")
        database.payloads.put("parsed/t/d/doc10/1", b"other doc")
        database.payloads.put("parsed/t/d/doc2/1", b"other doc 2")
        database.payloads.put("parsed/t/d/doc1/3", b"v3", replace_prefix="parsed/t/d/doc1/")
        assert database.payloads.get("parsed/t/d/doc1/1") is None
        assert database.payloads.get("parsed/t/d/doc1/2") is None
        assert database.payloads.get("parsed/t/d/doc1/3") == b"v3"
        assert database.payloads.get("parsed/t/d/doc10/1") == b"other doc"
        assert database.payloads.get("parsed/t/d/doc2/1") == b"other doc 2"

    def test_replace_prefix_with_same_key_keeps_it(self, database: Database) -> None:
        database.payloads.put("p/a/1", b"x")
        database.payloads.put("p/a/1", b"y", replace_prefix="p/a/")
        assert database.payloads.get("p/a/1") == b"y"

    def test_delete_prefix(self, database: Database) -> None:
        database.payloads.put("p/a/1", b"1")
        database.payloads.put("p/a/2", b"2")
        database.payloads.put("p/b/1", b"3")
        database.payloads.delete_prefix("p/a/")
        assert database.payloads.get("p/a/1") is None
        assert database.payloads.get("p/a/2") is None
        assert database.payloads.get("p/b/1") == b"3"

    def test_replace_prefix_treats_underscore_literally(self, database: Database) -> None:
        database.payloads.put("parsed/t/d/doc-1/5", b"other document's text")
        database.payloads.put("parsed/t/d/doc_1/7", b"mine", replace_prefix="parsed/t/d/doc_1/")
        assert database.payloads.get("parsed/t/d/doc-1/5") == b"other document's text"

    def test_replace_prefix_is_case_sensitive(self, database: Database) -> None:
        database.payloads.put("parsed/t/d/Doc1/5", b"other document's text")
        database.payloads.put("parsed/t/d/doc1/7", b"mine", replace_prefix="parsed/t/d/doc1/")
        assert database.payloads.get("parsed/t/d/Doc1/5") == b"other document's text"


# --- schema and connections -------------------------------------------------------


def test_migrate_is_idempotent(database: Database) -> None:
    begin(database, 1)
    database.payloads.put("k", b"kept")
    migrate(database.engine)
    migrate(database.engine)
    with database.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    assert len(versions) == 1
    assert database.payloads.get("k") == b"kept"
    state = database.documents.get(KEY)
    assert state is not None
    assert state.version == 1


def test_closed_postgres_port_is_transient() -> None:
    engine = create_db_engine(CLOSED_PG_URL)
    db = Database(engine)
    try:
        with pytest.raises(TransientError, match="database unavailable"), db.tx():
            pass
        # a repository write surfaces the same way
        with pytest.raises(TransientError):
            db.payloads.put("k", b"v")
    finally:
        db.dispose()


def test_closed_postgres_port_is_transient_for_reads() -> None:
    db = Database(create_db_engine(CLOSED_PG_URL))
    try:
        with pytest.raises(TransientError):
            db.documents.get(KEY)
        with pytest.raises(TransientError):
            db.segments.existing(KEY)
        with pytest.raises(TransientError):
            db.embeddings.get_many("p", "m", ["h"])
    finally:
        db.dispose()


def test_connection_lost_inside_a_transaction_is_transient(
    database: Database, request: pytest.FixtureRequest
) -> None:
    if database.dialect != "postgresql":
        pytest.skip("killing the server side of a connection needs PostgreSQL")
    with pytest.raises(TransientError), database.tx() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    # the pool recovers afterwards
    assert database.payloads.get("nothing") is None
