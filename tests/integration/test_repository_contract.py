"""The storage contract (domain.ports.UnitOfWork and its repositories), one
suite run against every implementation: the in-memory unit of work the stage
unit tests use, and the SQL one on SQLite and a real PostgreSQL (the
``uow_factory`` fixture). Repositories load and save; the rules themselves are
tested without storage in tests/unit/test_documents.py.

The last part covers what only the SQL adapter has: the schema and its
migrations, float32 bytes on disk, row locks between concurrent writers, and
database failures surfacing as TransientError."""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select, text
from sqlalchemy import inspect as sa_inspect

from domain.claim_check import parsed_key, removals_key, upload_key
from domain.documents import DocKey, Document, IndexingStatus, SplitCounts
from domain.errors import PermanentError, TransientError
from domain.ports import UnitOfWorkFactory
from domain.segments import ChunkText, Segment, SegmentDiff, build_segments, diff_segments
from infra.db.database import Database
from infra.db.engine import create_db_engine, migrate
from infra.db.models import DatasetRow, DocumentRow, EmbeddingRow, SegmentRow
from infra.db.unit_of_work import SqlUnitOfWorkFactory

pytestmark = pytest.mark.integration

S = IndexingStatus
KEY = DocKey("tenant-a", "ds_1", "doc-1")
OTHER = DocKey("tenant-a", "ds_1", "doc-2")
CLOSED_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:1/x"


def create(
    uow: UnitOfWorkFactory, version: int = 1, key: DocKey = KEY, source: str = "a.txt"
) -> Document:
    """What the parse stage does for a new document."""
    with uow() as w:
        doc = w.documents.get(key, for_update=True)
        if doc is None:
            doc = Document.new(key)
            w.documents.add(doc)
        assert doc.start_parsing(version, source, content_hash="hash", mime_type="text/plain")
        w.documents.save(doc)
        w.commit()
    return doc


def load(uow: UnitOfWorkFactory, key: DocKey = KEY) -> Document:
    with uow(readonly=True) as r:
        doc = r.documents.get(key)
    assert doc is not None
    return doc


def segs(*texts: str, key: DocKey = KEY, start: int = 0) -> list[Segment]:
    chunks = [ChunkText(t, tokens=len(t.split())) for t in texts]
    return build_segments(key.dataset_id, key.document_id, chunks, start, key.tenant_id)


def split(
    uow: UnitOfWorkFactory,
    texts: Sequence[str],
    key: DocKey = KEY,
    keep_removed: bool = False,
) -> tuple[tuple[int, int, int], SegmentDiff]:
    """What the split stage does: diff, replace the segment set, record it."""
    new = segs(*texts, key=key)
    with uow() as w:
        doc = w.documents.get(key, for_update=True)
        assert doc is not None
        diff = diff_segments(w.segments.existing(key), new)
        totals = w.segments.replace_split(doc, new, diff, keep_removed)
        counts = SplitCounts(diff.added_count, diff.kept_count, len(diff.removed))
        pending = bool(diff.to_index or (diff.removed and not keep_removed))
        assert doc.split(doc.version, counts, totals, pending)
        w.documents.save(doc)
        w.commit()
    return totals, diff


def mark_indexed(uow: UnitOfWorkFactory, ids: Sequence[str]) -> None:
    with uow() as w:
        w.segments.mark("vector_indexed", ids)
        w.segments.mark("keywords_indexed", ids)
        w.commit()


def ids(*texts: str, key: DocKey = KEY) -> list[str]:
    return [s.index_node_id for s in segs(*texts, key=key)]


def _row_id(r: Any, index_node_id: str) -> int:
    """The segment_id (row id) a person would use: the contract has no
    accessor for it, so find it by trying ids."""
    for candidate in range(1, 10_000):
        row = r.segments.find(KEY, None, candidate)
        if row is not None and row.index_node_id == index_node_id:
            return candidate
    raise AssertionError(f"no row id for {index_node_id}")


def unkeyed(doc: Document) -> Document:
    return dataclasses.replace(doc, pk=None)


# --- the unit of work -------------------------------------------------------------


class TestUnitOfWork:
    def test_commit_makes_work_visible(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory)
        with uow_factory(readonly=True) as r:
            assert r.documents.get(KEY) is not None

    def test_no_commit_rolls_back(self, uow_factory: UnitOfWorkFactory) -> None:
        with uow_factory() as w:
            w.documents.add(Document.new(KEY, version=1))
            w.payloads.put("k", b"v")
        with uow_factory(readonly=True) as r:
            assert r.documents.get(KEY) is None
            assert r.payloads.get("k") is None

    def test_an_exception_rolls_back_and_passes_through(
        self, uow_factory: UnitOfWorkFactory
    ) -> None:
        create(uow_factory, 1)
        with pytest.raises(ValueError, match="boom"), uow_factory() as w:
            doc = w.documents.get(KEY, for_update=True)
            assert doc is not None and doc.start_parsing(2, "b.txt")
            w.documents.save(doc)
            raise ValueError("boom")
        assert load(uow_factory).version == 1

    def test_a_read_only_unit_of_work_refuses_writes(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory, 1)
        # a programming error, never worth a retry
        with pytest.raises((RuntimeError, PermanentError)), uow_factory(readonly=True) as r:
            r.payloads.put("k", b"v")
            r.commit()
        with pytest.raises((RuntimeError, PermanentError)), uow_factory(readonly=True) as r:
            doc = r.documents.get(KEY)
            assert doc is not None and doc.start_parsing(2, "b.txt")
            r.documents.save(doc)
            r.commit()
        assert get(uow_factory, "k") is None
        assert load(uow_factory).version == 1
        put(uow_factory, "k", b"written")  # a writer after them is unaffected
        assert get(uow_factory, "k") == b"written"

    def test_work_after_a_commit_needs_its_own(self, uow_factory: UnitOfWorkFactory) -> None:
        with uow_factory() as w:
            w.payloads.put("first", b"1")
            w.commit()
            w.payloads.put("second", b"2")
        with uow_factory(readonly=True) as r:
            assert (r.payloads.get("first"), r.payloads.get("second")) == (b"1", None)


# --- documents --------------------------------------------------------------------


class TestDocuments:
    def test_round_trip_of_every_field(self, uow_factory: UnitOfWorkFactory) -> None:
        t = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
        doc = Document(
            key=KEY,
            version=7,
            status=S.ERROR,
            source="dir/a.md",
            doc_form="qa_model",
            error="bad table on page 3",
            content_hash="c" * 64,
            mime_type="text/markdown",
            uri="file:///srv/docs/" + "x" * 4000,  # the event's limit is 4096
            inline_content=False,
            chars=10**10,
            segment_count=12,
            tokens=3 * 10**9,
            word_count=99,
            embedded_texts=5,
            cache_hits=4,
            segments_added=3,
            segments_kept=2,
            segments_removed=1,
            split_version=7,
            last_dropped="split v6 dropped: document is at v7 (error)",
            updated_at=t,
            completed_at=None,
            error_at=t,
            parsing_started_at=t,
            splitting_started_at=t,
            indexing_started_at=t,
        )
        with uow_factory() as w:
            w.documents.add(doc.copy())
            w.commit()
        assert unkeyed(load(uow_factory)) == doc

    def test_save_writes_every_field(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory, 3)
        with uow_factory() as w:
            doc = w.documents.get(KEY, for_update=True)
            assert doc is not None
            assert doc.parsed(3, chars=42)
            assert doc.split(3, SplitCounts(2, 1, 0), (3, 30, 20), pending=True)
            assert doc.count_embeddings(3, embedded=2, hits=1)
            assert doc.fail(3, "x" * 5000)
            doc.drop("split", 2)
            w.documents.save(doc)
            w.commit()
        stored = load(uow_factory)
        assert stored == doc
        assert (stored.status, len(stored.error or ""), stored.chars) == (S.ERROR, 4000, 42)
        assert (stored.segment_count, stored.tokens, stored.word_count) == (3, 30, 20)
        assert (stored.embedded_texts, stored.cache_hits, stored.split_version) == (2, 1, 3)
        assert stored.last_dropped == "split v2 dropped: document is at v3 (error)"

    def test_same_document_id_in_two_tenants_is_two_documents(
        self, uow_factory: UnitOfWorkFactory
    ) -> None:
        create(uow_factory, 1, KEY)
        create(uow_factory, 9, DocKey("tenant-b", "ds_1", "doc-1"), source="b.txt")
        assert load(uow_factory, KEY).version == 1
        assert load(uow_factory, DocKey("tenant-b", "ds_1", "doc-1")).source == "b.txt"
        with uow_factory(readonly=True) as r:
            assert [d.dataset_id for d in r.documents.find("tenant-a", "doc-1")] == ["ds_1"]

    def test_get_many(self, uow_factory: UnitOfWorkFactory) -> None:
        elsewhere = DocKey("tenant-b", "ds_9", "doc-1")
        create(uow_factory, 1)
        create(uow_factory, 7, OTHER)
        create(uow_factory, 2, elsewhere)
        with uow_factory(readonly=True) as r:
            found = r.documents.get_many([KEY, OTHER, elsewhere, DocKey("x", "y", "z"), KEY])
            assert {k: d.version for k, d in found.items()} == {KEY: 1, OTHER: 7, elsewhere: 2}
            assert all(d.key == k for k, d in found.items())
            assert r.documents.get_many([]) == {}

    def test_add_many_get_many_for_update_and_save_many(
        self, uow_factory: UnitOfWorkFactory
    ) -> None:
        """What a stage does for a batch: create the new documents in one
        statement, lock and read them all, apply the rules, save them all."""
        elsewhere = DocKey("tenant-b", "ds_9", "doc-1")
        create(uow_factory, 4)  # exists already: add_many leaves it alone
        with uow_factory() as w:
            w.documents.add_many(
                [Document.new(k, source=f"{k.document_id}.txt") for k in (KEY, OTHER, elsewhere)]
            )
            docs = w.documents.get_many([KEY, OTHER, elsewhere], for_update=True)
            assert {k: d.version for k, d in docs.items()} == {KEY: 4, OTHER: 0, elsewhere: 0}
            assert docs[OTHER].source == "doc-2.txt" and docs[OTHER].pk is not None
            assert docs[OTHER].start_parsing(1, "b.txt", content_hash="h")
            assert docs[elsewhere].start_parsing(3, "c.txt")
            assert docs[KEY].parsed(4, chars=11)
            w.documents.save_many(list(docs.values()))
            w.documents.add_many([])
            w.documents.save_many([])
            w.commit()
        with uow_factory(readonly=True) as r:
            stored = r.documents.get_many([KEY, OTHER, elsewhere])
        assert stored == docs
        assert (stored[OTHER].version, stored[OTHER].status, stored[OTHER].source) == (
            1,
            S.PARSING,
            "b.txt",
        )
        assert (stored[elsewhere].version, stored[KEY].chars) == (3, 11)

    def test_list_find_and_status_counts(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory, 1, KEY, source="b.txt")
        create(uow_factory, 1, OTHER, source="a.txt")
        create(uow_factory, 1, DocKey("tenant-a", "ds_2", "doc-1"))
        with uow_factory() as w:
            doc = w.documents.get(OTHER, for_update=True)
            assert doc is not None and doc.fail(1, "unreadable")
            w.documents.save(doc)
            w.commit()
        with uow_factory(readonly=True) as r:
            assert [d.document_id for d in r.documents.list("tenant-a", "ds_1")] == [
                "doc-2",
                "doc-1",
            ]  # by source
            only = r.documents.list("tenant-a", "ds_1", ["doc-1", "missing"])
            assert [d.key for d in only] == [KEY]
            assert r.documents.list("tenant-a", "ds_1", []) == []
            assert sorted(d.dataset_id for d in r.documents.find("tenant-a", "doc-1")) == [
                "ds_1",
                "ds_2",
            ]
            assert r.documents.find("tenant-z", "doc-1") == []
            assert r.documents.status_counts("tenant-a", "ds_1") == {"parsing": 1, "error": 1}
            assert r.documents.status_counts("tenant-a", "nothing") == {}

    def test_many_documents_past_the_chunk_size(self, uow_factory: UnitOfWorkFactory) -> None:
        keys = [DocKey("t", "d", f"doc-{i:04d}") for i in range(1100)]
        with uow_factory() as w:
            for i, k in enumerate(keys):
                w.documents.add(Document.new(k, version=i, source=f"{i:04d}.txt"))
            w.commit()
        with uow_factory(readonly=True) as r:
            assert len(r.documents.list("t", "d")) == 1100
            wanted = [k.document_id for k in keys[::2]]
            assert {d.document_id for d in r.documents.list("t", "d", wanted)} == set(wanted)
            found = r.documents.get_many(keys)
            assert len(found) == 1100
            assert found[keys[1099]].version == 1099


# --- segments ---------------------------------------------------------------------


class TestSegments:
    def test_first_split_inserts_segments_and_totals(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory)
        totals, _ = split(uow_factory, ["alpha one", "beta two three", "知识库"])
        assert totals == (3, 2 + 3 + 1, 2 + 3 + 3)
        doc = load(uow_factory)
        assert (doc.status, doc.segment_count, doc.tokens) == (S.INDEXING, 3, 6)
        with uow_factory(readonly=True) as r:
            existing = r.segments.existing(KEY)
            assert sorted(e.position for e in existing) == [0, 1, 2]
            assert not any(e.indexed for e in existing)
            assert r.segments.count("tenant-a", "ds_1") == 3
            assert r.segments.pending_count(KEY) == 3
            assert r.segments.ids_for_document(KEY) == set(
                ids("alpha one", "beta two three", "知识库")
            )

    def test_existing_of_many_documents(self, uow_factory: UnitOfWorkFactory) -> None:
        nothing = DocKey("tenant-a", "ds_1", "doc-none")
        create(uow_factory)
        create(uow_factory, key=OTHER)
        split(uow_factory, ["a", "b", "c"])
        split(uow_factory, ["d"], key=OTHER)
        mark_indexed(uow_factory, ids("b"))
        with uow_factory() as w:
            doc = w.documents.get(KEY, for_update=True)
            assert doc is not None
            w.segments.append_imported(doc, "job-1", segs("imported", start=3))
            w.commit()
        with uow_factory(readonly=True) as r:
            many = r.segments.existing_many([KEY, OTHER, nothing])
            assert many == {k: r.segments.existing(k) for k in (KEY, OTHER, nothing)}
            assert [(e.index_node_id, e.position, e.indexed) for e in many[KEY]] == [
                (i, p, i == ids("b")[0]) for p, i in enumerate(ids("a", "b", "c"))
            ]
            assert many[nothing] == [] and r.segments.existing_many([]) == {}

    def test_update_inserts_keeps_repositions_resets_and_removes(
        self, uow_factory: UnitOfWorkFactory
    ) -> None:
        create(uow_factory, 1)
        split(uow_factory, ["a", "b", "c"])
        a, b, c = ids("a", "b", "c")
        mark_indexed(uow_factory, [a, b])
        with uow_factory() as w:
            w.segments.mark("vector_indexed", [c])  # c's keywords never finished
            w.commit()

        create(uow_factory, 2)
        totals, diff = split(uow_factory, ["b", "new", "c"])
        assert totals[0] == 3
        (new,) = ids("new")
        assert [s.index_node_id for s in diff.to_index] == [new, c]
        assert diff.removed == [a]
        with uow_factory(readonly=True) as r:
            rows = r.segments.by_ids([a, b, c, new])
            assert set(rows) == {b, c, new}
            assert [rows[i].position for i in (b, new, c)] == [0, 1, 2]
            assert rows[b].vector_indexed and rows[b].keywords_indexed  # kept as is
            assert not rows[c].vector_indexed  # re-indexed: both flags reset
            assert (rows[new].content, rows[new].source) == ("new", "a.txt")
            assert r.segments.pending_count(KEY) == 2
            assert r.segments.alive([a, b, "missing"]) == {b}

    def test_keep_removed_and_imported_segments_stay_after_the_split(
        self, uow_factory: UnitOfWorkFactory
    ) -> None:
        create(uow_factory, 1)
        split(uow_factory, ["a", "b"])
        with uow_factory() as w:
            doc = w.documents.get(KEY, for_update=True)
            assert doc is not None
            imported = segs("imported one", start=2)
            assert w.segments.append_imported(doc, "job-1", imported) == imported
            w.commit()
        create(uow_factory, 2)
        totals, diff = split(uow_factory, ["c", "b"], keep_removed=True)
        assert diff.removed == ids("a")
        assert totals[0] == 4  # c, b, the kept a, the imported segment
        with uow_factory(readonly=True) as r:
            pos = {
                i: s.position
                for i, s in r.segments.by_ids(r.segments.ids_for_document(KEY)).items()
            }
            (a, b, c), (imp,) = ids("a", "b", "c"), ids("imported one")
            assert pos == {c: 0, b: 1, a: 2, imp: 3}
            # existing() is the split's view: imported segments left out
            assert {e.index_node_id for e in r.segments.existing(KEY)} == {a, b, c}

    def test_replayed_split_is_idempotent(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory)
        new = segs("a", "b")
        for _ in range(2):
            with uow_factory() as w:
                doc = w.documents.get(KEY, for_update=True)
                assert doc is not None
                assert w.segments.replace_split(doc, new, diff_segments([], new), False) == (
                    2,
                    2,
                    2,
                )
                w.commit()
        with uow_factory(readonly=True) as r:
            assert r.segments.count("tenant-a", "ds_1") == 2

    def test_identical_content_in_two_documents_gets_two_rows(
        self, uow_factory: UnitOfWorkFactory
    ) -> None:
        create(uow_factory, 1, KEY)
        create(uow_factory, 1, OTHER, source="b.txt")
        split(uow_factory, ["shared paragraph"], KEY)
        split(uow_factory, ["shared paragraph"], OTHER)
        with uow_factory(readonly=True) as r:
            rows = r.segments.for_dataset("tenant-a", "ds_1")
            assert sorted((s.document_id, s.source) for s in rows.values()) == [
                ("doc-1", "a.txt"),
                ("doc-2", "b.txt"),
            ]
            assert {s.content for s in rows.values()} == {""}  # without the text
            assert r.segments.for_dataset("tenant-b", "ds_1") == {}

    def test_owners_and_in_dataset_know_each_ids_document(
        self, uow_factory: UnitOfWorkFactory
    ) -> None:
        slash = DocKey("tenant-a", "ds_1", "doc-1/annex")
        tenant_b = DocKey("tenant-b", "ds_1", "doc-1")
        other_dataset = DocKey("tenant-a", "ds_2", "doc-1")
        keys = (KEY, slash, tenant_b, other_dataset)
        for key in keys:
            create(uow_factory, 1, key)
            split(uow_factory, ["same text"], key)
        mine, *theirs = (ids("same text", key=k)[0] for k in keys)
        gone = ids("never split")[0]
        with uow_factory(readonly=True) as r:
            assert r.segments.owners([mine, *theirs, gone]) == {
                ids("same text", key=k)[0]: k for k in keys
            }
            assert r.segments.owners([]) == {}
            found = r.segments.in_dataset("tenant-a", "ds_1", [mine, *theirs, gone])
            assert sorted(found) == sorted([mine, theirs[0]])
            assert found[mine].content == "same text" and found[mine].source == "a.txt"
            assert r.segments.in_dataset("tenant-c", "ds_1", [mine]) == {}

    def test_append_imported_and_hashes(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory)
        split(uow_factory, ["a", "b"])
        with uow_factory(readonly=True) as r:
            start, hashes = r.segments.hashes(KEY)
        assert start == 2
        assert hashes == [s.doc_hash for s in segs("a", "b")]
        imported = segs("x", "y", start=start)
        for expected in (imported, []):  # a replayed import inserts nothing
            with uow_factory() as w:
                doc = w.documents.get(KEY, for_update=True)
                assert doc is not None
                assert w.segments.append_imported(doc, "job-1", imported) == expected
                w.commit()
        with uow_factory(readonly=True) as r:
            assert r.segments.hashes(KEY)[0] == 4
            assert r.segments.hashes(KEY, exclude_job="job-1") == (4, hashes)
            rows = r.segments.by_ids(ids("x", "y"))
            assert {s.job_id for s in rows.values()} == {"job-1"}
            assert r.segments.hashes(DocKey("t", "d", "none")) == (0, [])

    def test_delete_document_and_delete_one(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory, 1, KEY)
        create(uow_factory, 1, OTHER)
        split(uow_factory, ["a", "b", "c"], KEY)
        split(uow_factory, ["a"], OTHER)
        a, b, c = ids("a", "b", "c")
        with uow_factory() as w:
            gone = w.segments.delete_one(KEY, b, None)
            assert gone is not None
            assert (gone.index_node_id, gone.content, gone.tokens) == (b, "b", 1)
            assert w.segments.delete_one(KEY, b, None) is None
            assert w.segments.delete_one(OTHER, a, None) is None  # not that document's
            assert sorted(w.segments.delete_document(KEY)) == sorted([a, c])
            assert w.segments.delete_document(KEY) == []
            w.commit()
        with uow_factory(readonly=True) as r:
            assert r.segments.ids_for_document(KEY) == set()
            assert r.segments.ids_for_document(OTHER) == set(ids("a", key=OTHER))

    def test_mark_flags_and_pending(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory)
        split(uow_factory, ["a", "b"])
        a, b = ids("a", "b")
        with uow_factory() as w:
            assert w.segments.mark("vector_indexed", [a, b, a, "missing"]) == 2
            assert w.segments.pending_count(KEY) == 2
            assert w.segments.mark("keywords_indexed", [a]) == 1
            assert w.segments.pending_count(KEY) == 1
            w.segments.mark("keywords_indexed", [b])
            assert w.segments.pending_count(KEY) == 0
            w.segments.mark("vector_indexed", [b], value=False)
            assert w.segments.pending_count(KEY) == 1
            assert w.segments.mark("vector_indexed", []) == 0
            w.commit()
        with uow_factory(readonly=True) as r:
            rows = r.segments.by_ids([a, b])
            assert (rows[a].vector_indexed, rows[a].keywords_indexed) == (True, True)
            assert (rows[b].vector_indexed, rows[b].keywords_indexed) == (False, True)

    def test_ids_and_pending_counts_of_many_documents(self, uow_factory: UnitOfWorkFactory) -> None:
        elsewhere = DocKey("tenant-b", "ds_1", "doc-1")  # same ids, another tenant
        nothing = DocKey("tenant-a", "ds_1", "doc-none")
        for key, texts in ((KEY, ["a", "b"]), (OTHER, ["c"]), (elsewhere, ["d", "e", "f"])):
            create(uow_factory, key=key)
            split(uow_factory, texts, key=key)
        mark_indexed(uow_factory, ids("a", key=KEY))
        with uow_factory(readonly=True) as r:
            keys = [KEY, OTHER, elsewhere, nothing]
            assert r.segments.ids_for_documents(keys) == {
                KEY: set(ids("a", "b")),
                OTHER: set(ids("c", key=OTHER)),
                elsewhere: set(ids("d", "e", "f", key=elsewhere)),
                nothing: set(),
            }
            assert r.segments.pending_counts(keys) == {KEY: 1, OTHER: 1, elsewhere: 3, nothing: 0}
            assert r.segments.ids_for_documents([]) == {}
            assert r.segments.pending_counts([]) == {}

    def test_switches_decide_what_is_searchable(self, uow_factory: UnitOfWorkFactory) -> None:
        """Issue 19: a disabled segment, or any segment of a disabled or
        archived document, is out of ids_for_document, searchable, pending and
        search (in_dataset), and its row stays."""
        create(uow_factory)
        split(uow_factory, ["one", "two", "three"])
        one, two, three = ids("one", "two", "three")
        mark_indexed(uow_factory, [one])
        with uow_factory() as w:
            w.segments.switch(two, enabled=False)
            w.commit()
        with uow_factory(readonly=True) as r:
            assert r.segments.ids_for_document(KEY) == {one, three}
            assert r.segments.ids_for_documents([KEY]) == {KEY: {one, three}}
            assert r.segments.searchable([one, two, three, "nobody"]) == {one, three}
            assert r.segments.pending_count(KEY) == 1  # three
            assert r.segments.pending_counts([KEY]) == {KEY: 1}
            assert set(r.segments.in_dataset(KEY.tenant_id, KEY.dataset_id, [one, two])) == {one}
            found = r.segments.find(KEY, two, None)
            assert found is not None and not found.enabled and not found.searchable
            assert set(r.segments.for_dataset(KEY.tenant_id, KEY.dataset_id)) == {one, two, three}
        doc = load(uow_factory)
        with uow_factory() as w:
            assert doc.switch(doc.version, archived=True)
            w.documents.save(doc)
            w.commit()
        assert load(uow_factory).archived
        with uow_factory(readonly=True) as r:
            assert r.segments.ids_for_document(KEY) == set()
            assert r.segments.ids_for_documents([KEY]) == {KEY: set()}
            assert r.segments.pending_count(KEY) == 0
            assert r.segments.pending_counts([KEY]) == {KEY: 0}
        with uow_factory() as w:
            assert doc.switch(doc.version, archived=False, enabled=True)
            w.documents.save(doc)
            w.segments.switch(two, enabled=True)
            w.commit()
        with uow_factory(readonly=True) as r:
            assert r.segments.ids_for_document(KEY) == {one, two, three}
            by_id = r.segments.find(KEY, None, _row_id(r, two))
            assert by_id is not None and by_id.index_node_id == two and by_id.enabled

    def test_rewrite_gives_one_segment_new_text(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory)
        split(uow_factory, ["one", "two"])
        one, two = ids("one", "two")
        mark_indexed(uow_factory, [one, two])
        (new,) = segs("edited two", start=1)
        with uow_factory() as w:
            w.segments.rewrite(two, new, 1)
            w.commit()
        with uow_factory(readonly=True) as r:
            assert r.segments.ids_for_document(KEY) == {one, new.index_node_id}
            row = r.segments.find(KEY, new.index_node_id, None)
            assert row is not None and row.content == "edited two" and row.position == 1
            assert not (row.vector_indexed or row.keywords_indexed)
            assert r.segments.find(KEY, two, None) is None

    def test_many_segments_past_the_chunk_size(self, uow_factory: UnitOfWorkFactory) -> None:
        create(uow_factory)
        texts = [f"paragraph {i}" for i in range(1200)]
        totals, _ = split(uow_factory, texts)
        assert totals[0] == 1200
        every = ids(*texts)
        mark_indexed(uow_factory, every)
        with uow_factory(readonly=True) as r:
            assert r.segments.alive([*every, "missing"]) == set(every)
            assert len(r.segments.by_ids(every)) == 1200
            assert r.segments.pending_count(KEY) == 0
        create(uow_factory, 2)
        totals, diff = split(uow_factory, list(reversed(texts[:1100])))
        assert totals[0] == 1100 and len(diff.removed) == 100
        with uow_factory(readonly=True) as r:
            rows = r.segments.by_ids(every)
            assert len(rows) == 1100
            assert rows[every[0]].position == 1099
            assert rows[every[1099]].position == 0


# --- embedding cache --------------------------------------------------------------


class TestEmbeddingCache:
    def test_round_trip_is_exact_float32(self, uow_factory: UnitOfWorkFactory) -> None:
        rng = np.random.default_rng(0)
        vectors: dict[str, Any] = {
            "h1": rng.standard_normal(384).tolist(),  # float64 in, float32 stored
            "h2": [0.1, -0.0, 1e-45, 3.4028235e38, -1.5],
            "h3": np.linspace(-1, 1, 16, dtype=np.float32),
        }
        with uow_factory() as w:
            w.embeddings.put_many("t", "prov", "model-x", vectors)
            w.commit()
        with uow_factory(readonly=True) as r:
            got = r.embeddings.get_many("t", "prov", "model-x", ["h1", "h2", "h3", "missing"])
        assert set(got) == {"h1", "h2", "h3"}
        for h, v in vectors.items():
            expected = np.asarray(v, dtype="<f4")
            assert np.asarray(got[h]).dtype == np.dtype("<f4")
            assert np.asarray(got[h]).tobytes() == expected.tobytes()

    def test_keyed_by_tenant_provider_and_model(self, uow_factory: UnitOfWorkFactory) -> None:
        with uow_factory() as w:
            w.embeddings.put_many("t", "prov", "m1", {"h": [1.0, 2.0]})
            w.embeddings.put_many("t", "prov", "m2", {"h": [3.0, 4.0]})
            w.embeddings.put_many("t", "other", "m1", {"h": [5.0, 6.0]})
            w.embeddings.put_many("u", "prov", "m1", {"g": [7.0, 8.0]})
            w.commit()
        with uow_factory(readonly=True) as r:
            assert list(r.embeddings.get_many("t", "prov", "m1", ["h"])["h"]) == [1.0, 2.0]
            assert list(r.embeddings.get_many("t", "prov", "m2", ["h"])["h"]) == [3.0, 4.0]
            assert list(r.embeddings.get_many("t", "other", "m1", ["h"])["h"]) == [5.0, 6.0]
            assert r.embeddings.get_many("t", "nobody", "m1", ["h"]) == {}
            # issue 20 item 6: one tenant's entries are no hit for another
            assert r.embeddings.get_many("u", "prov", "m1", ["h"]) == {}
            assert r.embeddings.get_many("t", "prov", "m1", ["g"]) == {}
            assert r.embeddings.count() == 4
            assert r.embeddings.count("prov") == 3
            assert r.embeddings.count("prov", "m1") == 2
            assert r.embeddings.count("prov", "m1", "t") == 1

    def test_prune_a_deleted_document(self, uow_factory: UnitOfWorkFactory) -> None:
        """Before a document's segments go: the tenant's entries only it uses
        go with them (every model); shared texts, other tenants' entries of the
        same text and entries of other documents stay."""
        theirs = DocKey("tenant-b", "ds_1", "doc-1")
        elsewhere = DocKey("tenant-a", "ds_2", "doc-9")
        for key, texts in ((KEY, ["mine", "shared"]), (OTHER, ["shared", "other"])):
            create(uow_factory, key=key)
            split(uow_factory, texts, key=key)
        for key, texts in ((theirs, ["mine"]), (elsewhere, ["other"])):
            create(uow_factory, key=key)
            split(uow_factory, texts, key=key)
        h = {t: segs(t)[0].doc_hash for t in ("mine", "shared", "other", "stale")}
        with uow_factory() as w:
            for tenant in ("tenant-a", "tenant-b"):
                for model in ("m1", "m2"):
                    w.embeddings.put_many(tenant, "p", model, {v: [1.0] for v in h.values()})
            w.commit()
        with uow_factory() as w:
            assert w.embeddings.prune("tenant-a", "ds_1", []) == 0
            assert w.embeddings.prune("tenant-a", "ds_1", ["doc-1"]) == 2  # "mine", both models
            w.segments.delete_document(KEY)
            w.commit()
        with uow_factory(readonly=True) as r:
            left = set(r.embeddings.get_many("tenant-a", "p", "m2", h.values()))
            assert left == {h["shared"], h["other"], h["stale"]}
            assert len(r.embeddings.get_many("tenant-b", "p", "m1", h.values())) == 4
        with uow_factory() as w:
            # a whole dataset: "other" is still used in ds_2
            assert w.embeddings.prune("tenant-a", "ds_1") == 2  # "shared", both models
            w.commit()
        with uow_factory() as w:
            # no scope: whatever no segment of the tenant uses ("stale")
            assert w.embeddings.prune("tenant-a") == 2
            assert w.embeddings.prune("tenant-a") == 0
            w.commit()
        with uow_factory(readonly=True) as r:
            assert set(r.embeddings.get_many("tenant-a", "p", "m1", h.values())) == {h["other"]}
            assert r.embeddings.count(tenant_id="tenant-b") == 8

    def test_existing_key_is_ignored(self, uow_factory: UnitOfWorkFactory) -> None:
        for vectors in ({"h": [1.0, 2.0], "g": [0.5, 0.5]}, {"h": [9.0, 9.0], "k": [7.0, 7.0]}):
            with uow_factory() as w:
                w.embeddings.put_many("t", "p", "m", vectors)
                w.commit()
        with uow_factory(readonly=True) as r:
            got = r.embeddings.get_many("t", "p", "m", ["h", "g", "k"])
            assert list(got["h"]) == [1.0, 2.0]  # first write wins, no error
            assert list(got["k"]) == [7.0, 7.0]
            assert r.embeddings.count("p", "m") == 3

    def test_concurrent_writers_with_overlapping_keys(self, uow_factory: UnitOfWorkFactory) -> None:
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def writer(i: int) -> None:
            try:
                start.wait(timeout=10)
                for round_ in range(3):
                    keys = [f"h{j:03d}" for j in range(i * 20, i * 20 + 60)]  # overlaps
                    with uow_factory() as w:
                        w.embeddings.put_many(
                            "t", "p", "m", {k: [float(i), float(round_)] for k in reversed(keys)}
                        )
                        w.commit()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        with uow_factory(readonly=True) as r:
            assert r.embeddings.count("p", "m") == 120  # h000..h119, one row each
            assert (
                len(r.embeddings.get_many("t", "p", "m", [f"h{j:03d}" for j in range(120)])) == 120
            )

    def test_many_keys_past_the_chunk_size(self, uow_factory: UnitOfWorkFactory) -> None:
        vectors = {f"{i:064x}": [float(i)] * 4 for i in range(1200)}
        with uow_factory() as w:
            w.embeddings.put_many("t", "p", "m", vectors)
            w.commit()
        with uow_factory(readonly=True) as r:
            got = r.embeddings.get_many("t", "p", "m", list(vectors))
        assert len(got) == 1200
        assert list(got[f"{1199:064x}"]) == [1199.0] * 4


# --- claim-check store ------------------------------------------------------------


def put(uow: UnitOfWorkFactory, key: str, data: bytes, replace_prefix: str | None = None) -> None:
    with uow() as w:
        w.payloads.put(key, data, replace_prefix=replace_prefix)
        w.commit()


def get(uow: UnitOfWorkFactory, key: str) -> bytes | None:
    with uow(readonly=True) as r:
        return r.payloads.get(key)


class TestClaimCheck:
    def test_put_get_overwrite(self, uow_factory: UnitOfWorkFactory) -> None:
        data = bytes(range(256)) * 4
        put(uow_factory, "parsed/t/d/doc-1/1", data)
        got = get(uow_factory, "parsed/t/d/doc-1/1")
        assert got == data and isinstance(got, bytes)
        assert get(uow_factory, "parsed/t/d/doc-1/2") is None
        put(uow_factory, "parsed/t/d/doc-1/1", b"two")
        assert get(uow_factory, "parsed/t/d/doc-1/1") == b"two"

    def test_get_many_and_delete_many_by_exact_key(self, uow_factory: UnitOfWorkFactory) -> None:
        put(uow_factory, "p/a", b"a")
        put(uow_factory, "p/a/longer", b"longer")
        put(uow_factory, "p/b", b"b")
        with uow_factory(readonly=True) as r:
            assert r.payloads.get_many(["p/a", "p/b", "p/nothing", "p/a"]) == {
                "p/a": b"a",
                "p/b": b"b",
            }
            assert r.payloads.get_many([]) == {}
        with uow_factory() as w:
            w.payloads.delete_many(["p/a", "p/nothing"])  # exact: p/a/longer stays
            w.payloads.delete_many([])
            w.commit()
        assert (get(uow_factory, "p/a"), get(uow_factory, "p/a/longer")) == (None, b"longer")
        assert get(uow_factory, "p/b") == b"b"

    def test_large_payload(self, uow_factory: UnitOfWorkFactory) -> None:
        data = np.random.default_rng(1).bytes(8 * 1024 * 1024)
        put(uow_factory, "big", data)
        assert get(uow_factory, "big") == data

    def test_replace_prefix_drops_older_versions_of_the_same_document(
        self, uow_factory: UnitOfWorkFactory
    ) -> None:
        for key, data in [
            ("parsed/t/d/doc1/1", b"v1"),
            ("parsed/t/d/doc1/2", b"v2"),
            ("parsed/t/d/doc10/1", b"other doc"),
            ("parsed/t/d/doc2/1", b"other doc 2"),
        ]:
            put(uow_factory, key, data)
        put(uow_factory, "parsed/t/d/doc1/3", b"v3", replace_prefix="parsed/t/d/doc1/")
        assert get(uow_factory, "parsed/t/d/doc1/1") is None
        assert get(uow_factory, "parsed/t/d/doc1/2") is None
        assert get(uow_factory, "parsed/t/d/doc1/3") == b"v3"
        assert get(uow_factory, "parsed/t/d/doc10/1") == b"other doc"
        assert get(uow_factory, "parsed/t/d/doc2/1") == b"other doc 2"
        put(uow_factory, "parsed/t/d/doc1/3", b"v3'", replace_prefix="parsed/t/d/doc1/")
        assert get(uow_factory, "parsed/t/d/doc1/3") == b"v3'"

    def test_delete_prefix(self, uow_factory: UnitOfWorkFactory) -> None:
        for key in ("p/a/1", "p/a/2", "p/b/1"):
            put(uow_factory, key, key.encode())
        with uow_factory() as w:
            w.payloads.delete_prefix("p/a/")
            w.commit()
        assert [get(uow_factory, k) for k in ("p/a/1", "p/a/2", "p/b/1")] == [None, None, b"p/b/1"]

    def test_prefixes_are_literal_and_case_sensitive(self, uow_factory: UnitOfWorkFactory) -> None:
        put(uow_factory, "parsed/t/d/doc-1/5", b"other document's text")
        put(uow_factory, "parsed/t/d/Doc1/5", b"another document's text")
        put(uow_factory, "parsed/t/d/doc_1/7", b"mine", replace_prefix="parsed/t/d/doc_1/")
        put(uow_factory, "parsed/t/d/doc1/7", b"mine", replace_prefix="parsed/t/d/doc1/")
        assert get(uow_factory, "parsed/t/d/doc-1/5") == b"other document's text"
        assert get(uow_factory, "parsed/t/d/Doc1/5") == b"another document's text"


# --- import jobs ------------------------------------------------------------------


def job(uow: UnitOfWorkFactory, tenant_id: str, job_id: str) -> dict[str, Any] | None:
    """The tenant's only job called ``job_id``."""
    with uow(readonly=True) as r:
        found = r.jobs.find(tenant_id, job_id)
    assert len(found) <= 1, found
    return found[0] if found else None


class TestImportJobs:
    def test_lifecycle(self, uow_factory: UnitOfWorkFactory) -> None:
        with uow_factory() as w:
            w.jobs.create(KEY, "import-1", 3)
            w.jobs.create(KEY, "import-1", 99)  # a replayed create changes nothing
            w.commit()
        j = job(uow_factory, "tenant-a", "import-1")
        assert j is not None
        assert (j["status"], j["total"], j["completed"], j["document_id"]) == (
            "waiting",
            3,
            0,
            "doc-1",
        )
        with uow_factory() as w:
            w.jobs.processing(KEY, "import-1", fresh=3)
            w.commit()
        assert (job(uow_factory, "tenant-a", "import-1") or {})["status"] == "processing"
        with uow_factory() as w:
            w.jobs.complete_for_document(KEY)
            w.commit()
        j = job(uow_factory, "tenant-a", "import-1") or {}
        assert (j["status"], j["completed"]) == ("completed", 3)
        assert job(uow_factory, "tenant-a", "missing") is None
        with uow_factory(readonly=True) as r:
            assert (r.jobs.get(KEY, "import-1") or {})["status"] == "completed"
            assert r.jobs.get(OTHER, "import-1") is None

    def test_complete_for_many_documents(self, uow_factory: UnitOfWorkFactory) -> None:
        third = DocKey("tenant-a", "ds_2", "doc-1")
        with uow_factory() as w:
            for key in (KEY, OTHER, third):
                w.jobs.create(key, "import-1", 2)
                w.jobs.processing(key, "import-1", fresh=2)
            w.jobs.create(OTHER, "import-2", 5)  # waiting: not completed by a document
            w.commit()
        with uow_factory() as w:
            w.jobs.complete_for_documents([KEY, OTHER])
            w.jobs.complete_for_documents([])
            w.commit()
        with uow_factory(readonly=True) as r:
            got = {
                (k, j): (r.jobs.get(k, j) or {}).get("status")
                for k, j in ((KEY, "import-1"), (OTHER, "import-1"), (OTHER, "import-2"))
            }
            assert got == {
                (KEY, "import-1"): "completed",
                (OTHER, "import-1"): "completed",
                (OTHER, "import-2"): "waiting",
            }
            assert (r.jobs.get(third, "import-1") or {})["status"] == "processing"

    def test_a_replayed_import_completes_at_once(self, uow_factory: UnitOfWorkFactory) -> None:
        with uow_factory() as w:
            w.jobs.create(KEY, "import-1", 2)
            w.jobs.processing(KEY, "import-1", fresh=0)
            w.commit()
        j = job(uow_factory, "tenant-a", "import-1") or {}
        assert (j["status"], j["completed"]) == ("completed", 2)

    def test_keyed_by_tenant(self, uow_factory: UnitOfWorkFactory) -> None:
        theirs = DocKey("tenant-b", "ds_1", "doc-7")
        with uow_factory() as w:
            w.jobs.create(KEY, "import-1", 3)
            w.jobs.create(theirs, "import-1", 5)
            w.jobs.fail(theirs, "import-1", "bad segment")
            w.commit()
        mine, other = (
            job(uow_factory, "tenant-a", "import-1"),
            job(uow_factory, "tenant-b", "import-1"),
        )
        assert mine is not None and other is not None
        assert (mine["status"], mine["total"], mine["error"]) == ("waiting", 3, None)
        assert (other["status"], other["total"], other["error"]) == ("error", 5, "bad segment")

    @pytest.mark.parametrize(
        "second", [DocKey("tenant-a", "ds_2", "doc-1"), OTHER], ids=["dataset", "document"]
    )
    def test_a_job_id_reused_elsewhere_never_touches_the_first(
        self, uow_factory: UnitOfWorkFactory, second: DocKey
    ) -> None:
        """Issue 20 item 7: an import into another dataset (or document)
        reusing a job id failed, and turned the first, completed job into
        `error`."""
        with uow_factory() as w:
            w.jobs.create(KEY, "import-1", 2)
            w.jobs.processing(KEY, "import-1", fresh=0)
            w.jobs.create(second, "import-1", 5)
            w.jobs.fail(second, "import-1", f"document {second.document_id} does not exist")
            w.commit()
        with uow_factory(readonly=True) as r:
            first, reused = r.jobs.get(KEY, "import-1"), r.jobs.get(second, "import-1")
            found = r.jobs.find("tenant-a", "import-1")
            in_ds = r.jobs.find("tenant-a", "import-1", second.dataset_id)
        assert first is not None and reused is not None
        assert (first["status"], first["total"], first["error"]) == ("completed", 2, None)
        assert (reused["status"], reused["total"]) == ("error", 5)
        assert [(j["dataset_id"], j["document_id"]) for j in found] == sorted(
            [(KEY.dataset_id, KEY.document_id), (second.dataset_id, second.document_id)]
        )
        assert {j["document_id"] for j in in_ds} >= {second.document_id}

    def test_delete_the_records_of_documents(self, uow_factory: UnitOfWorkFactory) -> None:
        elsewhere = DocKey("tenant-a", "ds_2", "doc-1")
        theirs = DocKey("tenant-b", "ds_1", "doc-1")
        with uow_factory() as w:
            for key in (KEY, OTHER, elsewhere, theirs):
                w.jobs.create(key, "import-1", 1)
                w.jobs.create(key, "import-2", 1)
            w.commit()
        with uow_factory() as w:
            assert w.jobs.delete("tenant-a", "ds_1", []) == 0
            assert w.jobs.delete("tenant-a", "ds_1", ["doc-1"]) == 2
            w.commit()
        with uow_factory(readonly=True) as r:
            assert r.jobs.get(KEY, "import-1") is None
            assert r.jobs.get(OTHER, "import-1") is not None
        with uow_factory() as w:
            assert w.jobs.delete("tenant-a", "ds_1") == 2  # the rest of the dataset
            w.commit()
        with uow_factory(readonly=True) as r:
            assert [j["dataset_id"] for j in r.jobs.find("tenant-a", "import-2")] == ["ds_2"]
            assert len(r.jobs.find("tenant-b", "import-2")) == 1

    def test_document_events_touch_only_unfinished_jobs(
        self, uow_factory: UnitOfWorkFactory
    ) -> None:
        with uow_factory() as w:
            for name in ("waiting", "processing", "done", "failed"):
                w.jobs.create(KEY, name, 1)
            w.jobs.create(OTHER, "elsewhere", 1)
            w.jobs.processing(KEY, "processing", fresh=1)
            w.jobs.processing(KEY, "done", fresh=0)
            w.jobs.fail(KEY, "failed", "earlier failure")
            w.commit()
        with uow_factory() as w:
            w.jobs.complete_for_document(KEY)  # only the processing one
            w.commit()
        status = {
            n: (job(uow_factory, "tenant-a", n) or {})["status"]
            for n in ("waiting", "processing", "done", "failed", "elsewhere")
        }
        assert status == {
            "waiting": "waiting",
            "processing": "completed",
            "done": "completed",
            "failed": "error",
            "elsewhere": "waiting",
        }
        with uow_factory() as w:
            w.jobs.fail_for_document(KEY, "the document was deleted")
            w.commit()
        waiting = job(uow_factory, "tenant-a", "waiting") or {}
        assert (waiting["status"], waiting["error"]) == ("error", "the document was deleted")
        assert (job(uow_factory, "tenant-a", "done") or {})["status"] == "completed"
        assert (job(uow_factory, "tenant-a", "failed") or {})["error"] == "earlier failure"
        assert (job(uow_factory, "tenant-a", "elsewhere") or {})["status"] == "waiting"


# ==================================================================================
# What only the SQL adapter has (SQLite and PostgreSQL)
# ==================================================================================


@pytest.fixture
def sql(database: Database) -> SqlUnitOfWorkFactory:
    return SqlUnitOfWorkFactory(database)


def scalar(db: Database, query: Any) -> Any:
    with db.engine.connect() as conn:
        return conn.execute(query).scalar_one()


class TestSqlDocuments:
    def test_add_creates_the_dataset_once(self, sql: SqlUnitOfWorkFactory) -> None:
        create(sql, 1, KEY)
        create(sql, 1, OTHER)
        create(sql, 1, DocKey("tenant-b", "ds_1", "doc-1"))
        assert scalar(sql.database, select(func.count()).select_from(DatasetRow)) == 2
        assert scalar(sql.database, select(func.count()).select_from(DocumentRow)) == 3

    def test_add_of_an_existing_document(self, sql: SqlUnitOfWorkFactory) -> None:
        create(sql, 5)
        with sql() as w:
            blank = Document.new(KEY)
            w.documents.add(blank)  # a writer that lost the race to create it
            assert (blank.version, blank.status, blank.pk) == (5, S.PARSING, load(sql).pk)
            assert not blank.start_parsing(4, "old.txt")  # fenced against the stored row
        with pytest.raises(TransientError, match="another writer added it first"), sql() as w:
            w.documents.add(Document.new(KEY, version=9, source="b.txt"))
        assert load(sql).version == 5

    def test_save_of_a_document_never_added(self, sql: SqlUnitOfWorkFactory) -> None:
        with pytest.raises(LookupError), sql() as w:
            w.documents.save(Document.new(KEY, version=1))

    def test_delete_one_by_row_id_and_unknown_flag(self, sql: SqlUnitOfWorkFactory) -> None:
        create(sql)
        split(sql, ["a", "b"])
        (b,) = ids("b")
        row_id = scalar(sql.database, select(SegmentRow.id).where(SegmentRow.index_node_id == b))
        with sql() as w:
            gone = w.segments.delete_one(KEY, None, row_id)
            assert gone is not None and gone.index_node_id == b
            assert w.segments.delete_one(KEY, None, None) is None
            with pytest.raises(ValueError, match="not a segment flag"):
                w.segments.mark("status", ids("a"))

    def test_float32_bytes_on_disk_not_a_pickle(self, sql: SqlUnitOfWorkFactory) -> None:
        v = np.random.default_rng(0).standard_normal(384)
        with sql() as w:
            w.embeddings.put_many("t", "p", "m", {"h1": v.tolist()})
            w.commit()
        with sql.database.engine.connect() as conn:
            dim, blob = conn.execute(select(EmbeddingRow.dim, EmbeddingRow.vector)).one()
        blob = bytes(blob)
        assert (dim, len(blob)) == (384, 384 * 4)  # plain little-endian float32, no framing
        assert blob == np.asarray(v, dtype="<f4").tobytes()
        with pytest.raises(pickle.UnpicklingError):
            pickle.loads(blob)


class TestSqlSchema:
    def test_migrate_is_idempotent(self, sql: SqlUnitOfWorkFactory) -> None:
        create(sql, 1)
        put(sql, "k", b"kept")
        migrate(sql.database.engine)
        migrate(sql.database.engine)
        with sql.database.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [
                (_migration_head(),)
            ]
        assert get(sql, "k") == b"kept"
        assert load(sql).version == 1

    def test_models_match_the_migrations(self, database: Database) -> None:
        from alembic.autogenerate import compare_metadata
        from alembic.migration import MigrationContext

        from infra.db.models import Base

        with database.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []

    def test_an_existing_database_upgrades(self, db_url: str) -> None:
        from alembic import command
        from alembic.config import Config

        from infra.db.engine import MIGRATIONS

        engine = create_db_engine(db_url)
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            conn.execute(
                text(
                    "INSERT INTO batch_jobs (job_id, tenant_id, dataset_id, document_id,"
                    " status, total, completed) VALUES ('import-1', 'tenant-a', 'ds_1',"
                    " 'doc-1', 'processing', 3, 0)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO documents (tenant_id, dataset_id, document_id, source, doc_form,"
                    " version, status, chars, segment_count, tokens, word_count, embedded_texts,"
                    " cache_hits, segments_added, segments_kept, segments_removed)"
                    " VALUES ('tenant-a', 'ds_1', 'doc-1', 'a.txt', 'text', 4, 'completed',"
                    " 1, 1, 1, 1, 1, 0, 1, 0, 0)"
                )
            )
            # claim-check keys of the format before 0008 (the last one ambiguous:
            # a '/' in some id), and one of the new format
            for key in (
                "upload/tenant-a/ds_1/doc-1/abc",
                "parsed/t/d/x/1",
                "removed/t/d/x/ids",
                "parsed/t/d/x/y/1",
            ):
                conn.execute(text("INSERT INTO payloads (key, data) VALUES (:k, 'x')"), {"k": key})
            conn.execute(text("INSERT INTO payloads (key, data) VALUES ('cc/kept', 'x')"))
            conn.execute(
                text(
                    "INSERT INTO keyword_postings (tenant_id, dataset_id, keyword, index_node_id,"
                    " document_id, weight) VALUES ('tenant-a', 'ds_1', 'kafka', 'n1', 'doc-1', 1)"
                )
            )
        migrate(engine)
        # 0005: keywords live in Milvus now; `kbstream rebuild` refills them
        assert "keyword_postings" not in sa_inspect(engine).get_table_names()
        # 0008: unambiguous claim-check keys of the old format moved to the new
        # one, ambiguous ones are gone
        with engine.connect() as conn:
            left = conn.execute(text("SELECT key FROM payloads")).scalars().all()
        assert sorted(left) == sorted(
            [
                "cc/kept",
                upload_key(DocKey("tenant-a", "ds_1", "doc-1"), "abc"),
                parsed_key(DocKey("t", "d", "x"), 1),
                removals_key(DocKey("t", "d", "x")),
            ]
        )
        db = Database(engine)
        try:
            uow = SqlUnitOfWorkFactory(db)
            doc = load(uow)
            assert (doc.version, doc.status, doc.last_dropped) == (4, S.COMPLETED, None)
            with uow() as w:
                w.jobs.create(DocKey("tenant-b", "ds_1", "doc-1"), "import-1", 9)
                w.commit()
            assert (job(uow, "tenant-a", "import-1") or {})["total"] == 3
            assert (job(uow, "tenant-b", "import-1") or {})["total"] == 9
        finally:
            db.dispose()

    def test_0009_moves_cached_vectors_to_the_tenants_using_them(self, db_url: str) -> None:
        """Each cached vector goes to every tenant with a segment of its text;
        a vector no segment uses goes. Jobs keep their rows under the new key."""
        from alembic import command
        from alembic.config import Config

        from infra.db.engine import MIGRATIONS

        engine = create_db_engine(db_url)
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        blob = np.asarray([1.0, 2.0], dtype="<f4").tobytes()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0006")
            for n, (tenant, doc_hash) in enumerate(
                [("tenant-a", "shared"), ("tenant-b", "shared"), ("tenant-b", "theirs")]
            ):
                conn.execute(
                    text(
                        "INSERT INTO documents (tenant_id, dataset_id, document_id, source,"
                        " doc_form, version, status, chars, segment_count, tokens, word_count,"
                        " embedded_texts, cache_hits, segments_added, segments_kept,"
                        " segments_removed) VALUES (:t, 'ds', :d, 'a.txt', 'text', 1,"
                        " 'completed', 1, 1, 1, 1, 1, 0, 1, 0, 0)"
                    ),
                    {"t": tenant, "d": f"doc-{n}"},
                )
                pk = conn.execute(text("SELECT max(id) FROM documents")).scalar_one()
                conn.execute(
                    text(
                        "INSERT INTO segments (document_pk, tenant_id, dataset_id, document_id,"
                        " index_node_id, doc_hash, position, content, word_count, tokens,"
                        " status, vector_indexed, keywords_indexed, version)"
                        " VALUES (:pk, :t, 'ds', :d, :n, :h, 0, 'x', 1, 1, 'completed',"
                        " true, true, 1)"
                    ),
                    {"pk": pk, "t": tenant, "d": f"doc-{n}", "n": f"node-{n}", "h": doc_hash},
                )
            for doc_hash in ("shared", "theirs", "unused"):
                conn.execute(
                    text(
                        "INSERT INTO embeddings (provider, model, doc_hash, dim, vector)"
                        " VALUES ('p', 'm', :h, 2, :v)"
                    ),
                    {"h": doc_hash, "v": blob},
                )
            conn.execute(
                text(
                    "INSERT INTO batch_jobs (job_id, tenant_id, dataset_id, document_id,"
                    " status, total, completed) VALUES ('import-1', 'tenant-a', 'ds',"
                    " 'doc-0', 'completed', 3, 3)"
                )
            )
        migrate(engine)
        db = Database(engine)
        try:
            uow = SqlUnitOfWorkFactory(db)
            with uow(readonly=True) as r:
                hashes = ["shared", "theirs", "unused"]
                assert set(r.embeddings.get_many("tenant-a", "p", "m", hashes)) == {"shared"}
                got = r.embeddings.get_many("tenant-b", "p", "m", hashes)
                assert set(got) == {"shared", "theirs"}
                assert list(got["theirs"]) == [1.0, 2.0]
                assert r.embeddings.count() == 3
                j = r.jobs.get(DocKey("tenant-a", "ds", "doc-0"), "import-1")
                assert j is not None and j["status"] == "completed"
        finally:
            db.dispose()


class TestSqlConcurrency:
    def test_a_reader_never_waits_for_the_writer(self, sql: SqlUnitOfWorkFactory) -> None:
        create(sql, 1)
        with sql() as w:  # holds SQLite's write lock until the block ends
            doc = w.documents.get(KEY, for_update=True)
            assert doc is not None and doc.start_parsing(2, "a.txt")
            w.documents.save(doc)
            started = time.monotonic()
            assert load(sql).version == 1  # the last committed state, at once
            assert time.monotonic() - started < 5
            w.commit()
        assert load(sql).version == 2

    @pytest.mark.parametrize(("first", "second"), [(4, 3), (3, 4)])
    @pytest.mark.parametrize("exists", [True, False], ids=["existing", "new"])
    def test_racing_writers_end_at_the_newest_version(
        self, sql: SqlUnitOfWorkFactory, first: int, second: int, exists: bool
    ) -> None:
        """Two writers load the same document for update and claim versions in
        either order; the row lock serializes them, so the newer version wins
        (issue 8 item 9). With ``exists=False`` both also race to add it."""
        if sql.database.dialect != "postgresql":
            pytest.skip("SQLite serializes writers at BEGIN IMMEDIATE; row locks are PostgreSQL's")
        if exists:
            create(sql, 1)
        holding = threading.Event()
        log: list[tuple[str, int, float]] = []
        errors: list[BaseException] = []

        def writer(version: int, hold: bool) -> None:
            try:
                with sql() as w:
                    doc = w.documents.get(KEY, for_update=True)
                    if doc is None:
                        doc = Document.new(KEY)
                        w.documents.add(doc)
                    log.append(("locked", version, time.monotonic()))
                    if hold:
                        holding.set()
                        time.sleep(0.5)
                    doc.start_parsing(version, f"v{version}.txt")
                    w.documents.save(doc)
                    log.append(("committing", version, time.monotonic()))
                    w.commit()
            except BaseException as exc:
                errors.append(exc)
                holding.set()

        one = threading.Thread(target=writer, args=(first, True))
        one.start()
        assert holding.wait(10)
        two = threading.Thread(target=writer, args=(second, False))
        two.start()
        one.join(30)
        two.join(30)
        assert not errors, errors
        at = {(what, v): t for what, v, t in log}
        assert at[("locked", second)] >= at[("committing", first)]  # it waited for the lock
        doc = load(sql)
        assert (doc.version, doc.source) == (4, "v4.txt")


class TestSqlFailures:
    def test_closed_postgres_port_is_transient(self) -> None:
        db = Database(create_db_engine(CLOSED_PG_URL))
        uow = SqlUnitOfWorkFactory(db)
        try:
            for readonly in (False, True):
                with pytest.raises(TransientError, match="database unavailable"), uow(readonly):
                    pass
            with pytest.raises(TransientError), db.begin():
                pass
            with pytest.raises(TransientError):
                db.count(EmbeddingRow.__table__)
        finally:
            db.dispose()

    def test_connection_lost_inside_a_unit_of_work_is_transient(
        self, sql: SqlUnitOfWorkFactory
    ) -> None:
        if sql.database.dialect != "postgresql":
            pytest.skip("killing the server side of a connection needs PostgreSQL")
        with pytest.raises(TransientError), sql() as w:
            w.connection.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        assert get(sql, "nothing") is None  # the pool recovers

    def test_a_failed_commit_is_transient(self, sql: SqlUnitOfWorkFactory) -> None:
        if sql.database.dialect != "postgresql":
            pytest.skip("killing the server side of a connection needs PostgreSQL")
        with sql() as w:
            w.payloads.put("k", b"v")
            pid = w.connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with sql.database.engine.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                admin.commit()
            with pytest.raises(TransientError, match="commit failed"):
                w.commit()
        assert get(sql, "k") is None


def _migration_head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from infra.db.engine import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head
