"""MilvusKeywordIndex against a real milvus-lite file: BM25 ranking in English
and Chinese (jieba terms), stop words left out, positive scores best first,
idempotent upserts, tenant and dataset isolation, deletes, strong reads for
completion, reopening from disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.documents import DocKey
from domain.ports import KeywordRow
from infra.keyword_index import MAX_TEXT_BYTES, MilvusKeywordIndex, clip
from infra.keywords import JiebaKeywordExtractor
from infra.vectors import MilvusVectorStore, collection_name
from kbstream.processes import MilvusLiteServer

pytestmark = pytest.mark.integration

DOC = DocKey("t1", "ds1", "doc-1")
TEXTS = {
    "n-remove": "如何移除文件：使用 rm 命令删除不需要的文件",
    "n-dir": "创建目录和列出目录内容的命令",
    "n-socket": "The socket module opens network connections to servers.",
    "n-json": "json.loads parses a JSON document into Python objects.",
}


def open_index(uri: str) -> tuple[MilvusVectorStore, MilvusKeywordIndex]:
    vectors = MilvusVectorStore(uri, collection_name("test", "m", 8), 8)
    return vectors, MilvusKeywordIndex(vectors, JiebaKeywordExtractor().terms)


@pytest.fixture
def index(milvus_uri: str) -> Iterator[MilvusKeywordIndex]:
    vectors, idx = open_index(milvus_uri)
    idx.upsert([KeywordRow(n, DOC, t) for n, t in TEXTS.items()])
    yield idx
    vectors.close()


def test_chinese_and_english_queries_rank_the_right_segment_first(
    index: MilvusKeywordIndex,
) -> None:
    for query, expected in [
        ("移除文件", "n-remove"),
        ("目录", "n-dir"),
        ("socket connections", "n-socket"),
        ("JSON", "n-json"),  # case folded
    ]:
        hits = index.search(query, "t1", "ds1", 5)
        assert hits and hits[0][0] == expected, (query, hits)
        scores = [s for _, s in hits]
        assert all(s > 0 for s in scores) and scores == sorted(scores, reverse=True)


def test_search_is_filtered_by_tenant_and_dataset(index: MilvusKeywordIndex) -> None:
    index.upsert([KeywordRow("other-ds", DocKey("t1", "ds2", "d"), "socket socket socket")])
    index.upsert([KeywordRow("other-t", DocKey("t2", "ds1", "d"), "socket socket socket")])
    found = {n for n, _ in index.search("socket", "t1", "ds1", 10)}
    assert found == {"n-socket"}
    assert index.search("", "t1", "ds1", 10) == []


def test_upsert_is_idempotent_and_replaces_the_text(index: MilvusKeywordIndex) -> None:
    index.upsert([KeywordRow("n-json", DOC, TEXTS["n-json"])])
    assert index.count("t1", "ds1") == len(TEXTS)
    index.upsert([KeywordRow("n-json", DOC, "pickle serializes objects")])
    assert index.count("t1", "ds1") == len(TEXTS)
    assert "n-json" not in {n for n, _ in index.search("JSON", "t1", "ds1", 10)}
    assert index.search("pickle", "t1", "ds1", 10)[0][0] == "n-json"


def test_deletes_and_reads_by_document(index: MilvusKeywordIndex) -> None:
    other = DocKey("t1", "ds1", "doc-2")
    index.upsert([KeywordRow("n-other", other, "another socket text")])
    assert set(index.ids_for_document(DOC)) == set(TEXTS)
    assert index.ids_for_documents([DOC, other, DocKey("t1", "ds1", "none")]) == {
        DOC: set(TEXTS),
        other: {"n-other"},
        DocKey("t1", "ds1", "none"): set(),
    }
    index.delete(["n-json"])
    assert "n-json" not in index.ids("t1", "ds1")
    index.delete_document(DOC)
    assert index.ids("t1", "ds1") == {"n-other": "doc-2"}
    index.delete_dataset("t1", "ds1")
    assert index.count("t1", "ds1") == 0


def test_the_index_survives_reopening(milvus_uri: str) -> None:
    vectors, idx = open_index(milvus_uri)
    idx.upsert([KeywordRow(n, DOC, t) for n, t in TEXTS.items()])
    vectors.close()
    vectors, idx = open_index(milvus_uri)
    try:
        assert idx.count("t1", "ds1") == len(TEXTS)
        assert idx.search("移除文件", "t1", "ds1", 3)[0][0] == "n-remove"
    finally:
        vectors.close()


def test_an_oversized_text_is_clipped_at_a_character_boundary(
    index: MilvusKeywordIndex,
) -> None:
    text = "文" * MAX_TEXT_BYTES  # 3 bytes a character
    clipped = clip(text)
    assert len(clipped.encode()) <= MAX_TEXT_BYTES and clipped == "文" * len(clipped)
    index.upsert([KeywordRow("n-big", DOC, text)])
    assert "n-big" in index.ids_for_document(DOC)


def test_stop_words_find_nothing_and_weigh_nothing(index: MilvusKeywordIndex) -> None:
    assert index.search("the of and", "t1", "ds1", 5) == []
    assert index.terms("The socket module") == "socket module"
    assert index.search("the socket", "t1", "ds1", 5) == index.search("socket", "t1", "ds1", 5)


def test_an_unknown_tokenizer_is_refused(milvus_uri: str) -> None:
    vectors = MilvusVectorStore(milvus_uri, collection_name("test", "m", 8), 8)
    with pytest.raises(ValueError, match="keyword tokenizer"):
        MilvusKeywordIndex(vectors, str.split, tokenizer="english")


def test_a_text_without_terms_is_still_an_entity(index: MilvusKeywordIndex) -> None:
    # completion needs every segment in the index, even one that only holds stop words
    index.upsert([KeywordRow("n-empty", DOC, "The ... !!")])
    assert "n-empty" in index.ids_for_document(DOC)
    assert "n-empty" not in {n for n, _ in index.search("the", "t1", "ds1", 10)}


def test_the_index_shares_the_vector_store_client_and_lock(milvus_uri: str) -> None:
    """milvus-lite serves one local file from one client per process."""
    vectors, idx = open_index(milvus_uri)
    try:
        assert idx.client is vectors.client and idx.lock is vectors.lock
    finally:
        vectors.close()


def test_the_index_recovers_when_its_collection_was_released(index: MilvusKeywordIndex) -> None:
    index.client.release_collection(index.collection)  # an operator, or another worker
    assert index.search("socket", "t1", "ds1", limit=5)[0][0] == "n-socket"
    assert index.count("t1", "ds1") == len(TEXTS)


# -- statistics of the whole dataset, whenever its texts arrived (issue 18) ----------

# 60 texts, one in ten about files: "files" is a fairly rare word here (idf 2.2)
FILLER = [
    f"reading and writing {'files' if i % 10 == 0 else 'data'} with the {w} module, example {i}"
    for i, w in enumerate(["os", "io", "pathlib", "shutil", "glob", "tempfile"] * 10)
]


def _flushed(idx: MilvusKeywordIndex, rows: list[KeywordRow]) -> None:
    """Rows written, then sealed into their own milvus-lite segment (what a
    run's end, or a full memtable, does)."""
    idx.upsert(rows)
    idx.client.flush(idx.collection)


def test_a_text_written_after_the_rest_scores_as_if_indexed_with_it(milvus_uri: str) -> None:
    vectors, idx = open_index(milvus_uri)
    try:
        late = KeywordRow("late", DocKey("t1", "late", "edited"), "the zymurgy of files")
        # the dataset "late" gets its edited sentence after the rest
        _flushed(
            idx, [KeywordRow(f"f{i}", DocKey("t1", "late", "d"), t) for i, t in enumerate(FILLER)]
        )
        idx.upsert([late])
        # the dataset "once" holds the same texts, indexed in one go
        idx.upsert(
            [KeywordRow(f"o{i}", DocKey("t1", "once", "d"), t) for i, t in enumerate(FILLER)]
            + [KeywordRow("once-late", DocKey("t1", "once", "edited"), late.text)]
        )
        late_hits = idx.search("zymurgy files", "t1", "late", 3)
        once_hits = idx.search("zymurgy files", "t1", "once", 3)
        assert late_hits[0][0] == "late"
        # one segment's statistics gave ln(4/3) = 0.288 for the rare word
        assert late_hits[0][1] == pytest.approx(once_hits[0][1], rel=1e-4)
        assert late_hits[0][1] > 4.0
    finally:
        vectors.close()


def test_documents_indexed_one_run_at_a_time_are_each_the_top_hit_for_their_rare_word(
    milvus_uri: str,
) -> None:
    rare = ["quokka", "axolotl", "pangolin", "narwhal"]
    vectors, idx = open_index(milvus_uri)
    try:
        _flushed(
            idx, [KeywordRow(f"f{i}", DocKey("t1", "ds", "old"), t) for i, t in enumerate(FILLER)]
        )
        vectors.close()
        for word in rare:  # one run each: a fresh process opens the file, writes, closes
            vectors, idx = open_index(milvus_uri)
            idx.upsert([KeywordRow(word, DocKey("t1", "ds", word), f"the {word} reads files")])
            vectors.close()
        vectors, idx = open_index(milvus_uri)
        for word in rare:
            hits = idx.search(f"{word} files", "t1", "ds", 5)
            assert hits[0][0] == word, (word, hits)
            # the other rare-word documents match "files" only, below it
            assert hits[0][1] > 2 * hits[1][1]
    finally:
        vectors.close()


def test_statistics_leave_out_deleted_texts_and_other_datasets(milvus_uri: str) -> None:
    vectors, idx = open_index(milvus_uri)
    try:
        key = DocKey("t1", "ds", "d")
        _flushed(idx, [KeywordRow(f"w{i}", key, "wombat burrow") for i in range(30)])
        idx.upsert([KeywordRow("other", DocKey("t1", "ds2", "d"), "wombat " * 5)])
        idx.upsert([KeywordRow("one", key, "wombat")])
        common = idx.search("wombat", "t1", "ds", 1)[0][1]
        idx.delete([f"w{i}" for i in range(30)])
        # now the only text of "ds" with the word: as rare as a word can be in it
        alone = idx.search("wombat", "t1", "ds", 1)
        assert alone[0][0] == "one" and alone[0][1] > 5 * common
    finally:
        vectors.close()


def test_the_milvus_lite_server_of_kbstream_up_scores_with_the_dataset_statistics(
    tmp_path: Path,
) -> None:
    """`kbstream up` serves milvus-lite from a child process: the same fix there."""
    server = MilvusLiteServer(tmp_path / "milvus" / "milvus.db").start()
    try:
        vectors, idx = open_index(server.uri)
        try:
            key = DocKey("t1", "ds", "d")
            _flushed(idx, [KeywordRow(f"f{i}", key, t) for i, t in enumerate(FILLER)])
            idx.upsert([KeywordRow("late", DocKey("t1", "ds", "e"), "the zymurgy of files")])
            hits = idx.search("zymurgy files", "t1", "ds", 3)
            assert hits[0][0] == "late" and hits[0][1] > 4.0, hits
        finally:
            vectors.close()
    finally:
        server.stop()
