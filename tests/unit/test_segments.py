"""domain.segments: doc_hash, index_node_id, segments and the diff an update applies."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.documents import IndexingStatus
from domain.segments import (
    ChunkText,
    ExistingSegment,
    Segment,
    build_segments,
    compute_doc_hash,
    count_words,
    diff_segments,
    make_index_node_id,
)


def chunks(*texts: str) -> list[ChunkText]:
    return [ChunkText(content=t, tokens=len(t.split())) for t in texts]


def existing(segs: list[Segment], indexed: bool | set[str] = True) -> list[ExistingSegment]:
    def is_indexed(s: Segment) -> bool:
        return indexed if isinstance(indexed, bool) else s.content in indexed

    return [ExistingSegment(s.index_node_id, s.doc_hash, s.position, is_indexed(s)) for s in segs]


class TestDocHash:
    def test_is_sha256_hex(self) -> None:
        h = compute_doc_hash("hello")
        assert len(h) == 64
        int(h, 16)

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            ("hello world", "  hello \t\n world  "),
            ("hello world", "hello\u3000world"),  # ideographic space
            ("hello world", "hello\u00a0world"),  # no-break space
            ("café", "cafe\u0301"),  # NFC vs NFD
            ("ＡＢＣ１２３", "ABC123"),  # full-width forms (NFKC)
            ("ﬁle", "file"),  # ligature (NFKC)
        ],
    )
    def test_ignores_whitespace_and_unicode_form(self, a: str, b: str) -> None:
        assert compute_doc_hash(a) == compute_doc_hash(b)

    @pytest.mark.parametrize(
        ("a", "b"),
        [
            ("hello world", "hello world!"),
            ("hello world", "Hello world"),
            ("hello world", "helloworld"),
            ("知识库", "知识"),
            ("a", ""),
        ],
    )
    def test_depends_on_content(self, a: str, b: str) -> None:
        assert compute_doc_hash(a) != compute_doc_hash(b)

    def test_answer_changes_hash(self) -> None:
        q = "What is it?"
        assert compute_doc_hash(q, "yes") != compute_doc_hash(q)
        assert compute_doc_hash(q, "yes") != compute_doc_hash(q, "no")
        assert compute_doc_hash(q, "") != compute_doc_hash(q)
        assert compute_doc_hash(q, " yes ") == compute_doc_hash(q, "yes")

    def test_answer_and_parent_are_not_interchangeable(self) -> None:
        assert compute_doc_hash("c", answer="x") != compute_doc_hash("c", parent="x")
        assert compute_doc_hash("c", parent="p1") != compute_doc_hash("c", parent="p2")

    def test_content_answer_boundary_matters(self) -> None:
        assert compute_doc_hash("ab", "c") != compute_doc_hash("a", "bc")


class TestIndexNodeId:
    def test_deterministic_uuid(self) -> None:
        a = make_index_node_id("ds", "doc", "h" * 64)
        assert a == make_index_node_id("ds", "doc", "h" * 64)
        assert uuid.UUID(a).version == 5
        assert len(a) == 36

    def test_differs_across_documents_datasets_hashes_and_occurrences(self) -> None:
        h = compute_doc_hash("same text")
        ids = {
            make_index_node_id("ds1", "doc1", h),
            make_index_node_id("ds1", "doc2", h),
            make_index_node_id("ds2", "doc1", h),
            make_index_node_id("ds1", "doc1", compute_doc_hash("other")),
            make_index_node_id("ds1", "doc1", h, 1),
            make_index_node_id("ds1", "doc1", h, 2),
        }
        assert len(ids) == 6

    def test_default_occurrence_is_zero(self) -> None:
        assert make_index_node_id("d", "x", "h") == make_index_node_id("d", "x", "h", 0)

    def test_fields_cannot_bleed_into_each_other(self) -> None:
        assert make_index_node_id("ab", "c", "h") != make_index_node_id("a", "bc", "h")


class TestBuildSegments:
    def test_positions_hashes_and_ids(self) -> None:
        segs = build_segments("ds", "doc", chunks("one", "two three"), start_position=5)
        assert [s.position for s in segs] == [5, 6]
        assert [s.content for s in segs] == ["one", "two three"]
        assert segs[1].doc_hash == compute_doc_hash("two three")
        assert segs[1].index_node_id == make_index_node_id("ds", "doc", segs[1].doc_hash)
        assert [s.tokens for s in segs] == [1, 2]

    def test_duplicate_paragraphs_get_distinct_ids(self) -> None:
        segs = build_segments("ds", "doc", chunks("same", "other", "same", "same "))
        assert len({s.index_node_id for s in segs}) == 4
        assert segs[0].doc_hash == segs[2].doc_hash == segs[3].doc_hash
        assert segs[2].index_node_id == make_index_node_id("ds", "doc", segs[0].doc_hash, 1)
        assert segs[3].index_node_id == make_index_node_id("ds", "doc", segs[0].doc_hash, 2)

    def test_same_chunks_in_two_documents_do_not_collide(self) -> None:
        a = build_segments("ds", "doc-a", chunks("shared paragraph"))
        b = build_segments("ds", "doc-b", chunks("shared paragraph"))
        assert a[0].doc_hash == b[0].doc_hash
        assert a[0].index_node_id != b[0].index_node_id

    def test_rebuild_is_identical(self) -> None:
        text = chunks("a", "b", "a")
        assert build_segments("ds", "doc", text) == build_segments("ds", "doc", text)

    def test_qa_and_parent_carried(self) -> None:
        segs = build_segments(
            "ds",
            "doc",
            [ChunkText("q?", answer="yes"), ChunkText("child", parent="the parent child")],
        )
        assert segs[0].answer == "yes"
        assert segs[0].doc_hash == compute_doc_hash("q?", "yes")
        assert segs[1].parent == "the parent child"
        assert segs[1].doc_hash == compute_doc_hash("child", parent="the parent child")

    def test_word_count_includes_answer(self) -> None:
        seg = build_segments("ds", "doc", [ChunkText("two words", answer="三个字")])[0]
        assert seg.word_count == 5


class TestDiff:
    def test_first_version_indexes_everything(self) -> None:
        new = build_segments("ds", "doc", chunks("a", "b"))
        d = diff_segments([], new)
        assert d.to_index == new
        assert d.kept == []
        assert d.removed == []
        assert d.added_count == 2
        assert d.kept_count == 0

    def test_update_adds_keeps_and_removes(self) -> None:
        old = build_segments("ds", "doc", chunks("keep1", "gone", "keep2"))
        new = build_segments("ds", "doc", chunks("new", "keep1", "keep2", "new2"))
        d = diff_segments(existing(old), new)
        assert [s.content for s in d.to_index] == ["new", "new2"]
        assert [s.content for s in d.kept] == ["keep1", "keep2"]
        assert d.removed == [old[1].index_node_id]
        assert d.added_count == 2
        assert d.kept_count == 2
        # kept segments carry their new positions
        assert [s.position for s in d.kept] == [1, 2]

    def test_kept_but_unindexed_is_indexed_again(self) -> None:
        old = build_segments("ds", "doc", chunks("done", "crashed"))
        new = build_segments("ds", "doc", chunks("done", "crashed"))
        d = diff_segments(existing(old, indexed={"done"}), new)
        assert [s.content for s in d.to_index] == ["crashed"]
        assert [s.content for s in d.kept] == ["done", "crashed"]
        assert d.added_count == 0
        assert d.removed == []

    def test_unchanged_document_does_nothing(self) -> None:
        segs = build_segments("ds", "doc", chunks("a", "b", "a"))
        d = diff_segments(existing(segs), build_segments("ds", "doc", chunks("a", "b", "a")))
        assert d.to_index == []
        assert d.removed == []
        assert d.kept_count == 3

    def test_whitespace_only_edit_keeps_segment(self) -> None:
        old = build_segments("ds", "doc", chunks("hello world"))
        new = build_segments("ds", "doc", chunks("hello   world"))
        d = diff_segments(existing(old), new)
        assert d.to_index == []
        assert d.removed == []

    def test_removing_one_of_two_duplicates(self) -> None:
        old = build_segments("ds", "doc", chunks("dup", "x", "dup"))
        new = build_segments("ds", "doc", chunks("dup", "x"))
        d = diff_segments(existing(old), new)
        assert d.removed == [old[2].index_node_id]
        assert d.to_index == []

    def test_removed_is_sorted(self) -> None:
        old = build_segments("ds", "doc", chunks(*[f"p{i}" for i in range(20)]))
        d = diff_segments(existing(old), [])
        assert d.removed == sorted(s.index_node_id for s in old)


paragraphs = st.lists(
    st.sampled_from(["alpha", "beta", "gamma", "知识库", "alpha ", "ＡＢ", "AB", "x y", "x  y"])
    | st.text(min_size=1, max_size=12),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(old=paragraphs, new=paragraphs, indexed=st.lists(st.booleans(), max_size=12))
def test_diff_partitions_old_and_new_ids(
    old: list[str], new: list[str], indexed: list[bool]
) -> None:
    old_segs = build_segments("ds", "doc", chunks(*old))
    new_segs = build_segments("ds", "doc", chunks(*new))
    flags = indexed + [True] * len(old_segs)
    ex = [
        ExistingSegment(s.index_node_id, s.doc_hash, s.position, flags[i])
        for i, s in enumerate(old_segs)
    ]
    d = diff_segments(ex, new_segs)

    old_ids = {s.index_node_id for s in old_segs}
    new_ids = {s.index_node_id for s in new_segs}
    kept = {s.index_node_id for s in d.kept}
    to_index = {s.index_node_id for s in d.to_index}
    removed = set(d.removed)

    assert len(old_ids) == len(old_segs)  # ids unique within a document
    assert len(new_ids) == len(new_segs)
    assert removed | kept == old_ids
    assert not removed & kept
    assert to_index | kept == new_ids
    assert d.added_count == len(new_ids - old_ids)
    unindexed = {e.index_node_id for e in ex if not e.indexed}
    assert to_index & kept == kept & unindexed


class TestCountWords:
    @pytest.mark.parametrize(
        ("text", "n"),
        [
            ("", 0),
            ("hello", 1),
            ("Hello, world! 2024 is here.", 5),
            ("  spaced   out\n\nwords\t", 3),
            ("知识库", 3),
            ("我们使用Python开发。", 7),  # 6 CJK characters + 1 word, punctuation is none
            ("混合 text 和 English", 5),
            ("日本語のテキスト", 8),
            ("한국어", 3),
            ("naïve café", 2),
        ],
    )
    def test_counts(self, text: str, n: int) -> None:
        assert count_words(text) == n

    def test_contractions_are_one_word(self) -> None:
        assert count_words("Don't stop, it's the user's turn") == 6


def test_status_finished() -> None:
    finished = {s for s in IndexingStatus if s.finished}
    assert finished == {IndexingStatus.COMPLETED, IndexingStatus.ERROR, IndexingStatus.DELETED}


@given(st.text(alphabet=st.sampled_from(list("ab c'’_-1é²中文한글カナ \n\t.,!？x")), max_size=60))
def test_count_words_agrees_with_its_reference_definition(text: str) -> None:
    from domain.segments import _count_words_slow

    assert count_words(text) == _count_words_slow(text)
