"""The created path end to end through the real CLI: embedded tansu broker,
SQLite, milvus-lite and the real all-MiniLM-L6-v2 model, every stage a
consumer group. Then search in every mode, re-index, and check idempotency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

SHARED = (
    "Reciprocal rank fusion merges the vector ranking and the keyword ranking. "
    "It adds one over sixty plus the rank for every list in which a segment appears."
)


def kb(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBSTREAM_")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "kbstream.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kbstream {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def kb_json(home: Path, *args: str) -> Any:
    return json.loads(kb(home, *args, "--json").stdout)


def make_corpus(root: Path) -> Path:
    docs = root / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "guide" / "kafka.md").write_text(
        "# Consumer groups\n\n"
        "A consumer group shares the partitions of a topic among its members. "
        "Each partition is read by exactly one member at a time.\n\n"
        "## Offsets\n\n"
        "Offsets are committed only after the side effects are durable, which gives "
        "at-least-once delivery.\n\n" + SHARED + "\n"
    )
    (docs / "milvus.html").write_text(
        "<html><head><title>Milvus</title><script>var x = 'noise';</script></head><body>"
        "<nav>Home | Docs | Blog</nav><main><h1>Vector search</h1>"
        "<p>Milvus stores dense embeddings and answers approximate nearest neighbour queries "
        "with an HNSW or IVF index. A partition key isolates datasets in one collection.</p>"
        f"<p>{SHARED}</p></main></body></html>"
    )
    (docs / "结巴.txt").write_bytes(
        (
            "结巴分词是一个中文分词组件。它支持精确模式、全模式和搜索引擎模式。\n\n"
            "关键词提取使用TF-IDF算法，为每个片段选出最重要的词语。倒排索引把关键词映射到片段。"
        ).encode("gb18030")
    )
    from docx import Document as Docx

    d = Docx()
    d.add_heading("Embedding cache", level=1)
    d.add_paragraph(
        "The embedding cache maps provider, model and doc_hash to a vector stored as float32 "
        "bytes, so the same text is never embedded twice for the same model."
    )
    d.save(str(docs / "cache.docx"))
    return docs


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("e2e")
    docs = make_corpus(root)
    home = root / "home"
    summary = kb_json(home, "index", str(docs), "--dataset", "kb")
    return {"home": home, "docs": docs, "summary": summary}


def test_index_completes_every_document(indexed: dict[str, Any]) -> None:
    s = indexed["summary"]
    assert s["documents"] == 4
    assert s["failed"] == 0
    assert s["completed"] == 4
    assert s["segments"] >= 4
    rows = kb_json(indexed["home"], "status", "--dataset", "kb")
    assert {Path(r["document"]).name for r in rows} == {
        "kafka.md",
        "milvus.html",
        "结巴.txt",
        "cache.docx",
    }
    assert all(
        r["status"] == "completed" and r["error"] is None and r["segments"] >= 1 for r in rows
    )


def test_shared_text_is_embedded_once(indexed: dict[str, Any]) -> None:
    s = indexed["summary"]
    stats = kb_json(indexed["home"], "stats", "--dataset", "kb")
    # every segment went to the model or the cache, and the model saw each distinct text once
    assert s["embedded"] + s["cache_hits"] == s["segments"]
    assert s["embedded"] == stats["cached_embeddings"]
    assert stats["segments"] == stats["vectors"] == s["segments"]
    assert stats["keyword_entities"] == stats["segments"] > 0
    assert stats["by_status"] == {"completed": 4}


@pytest.mark.parametrize(
    ("mode", "query", "expected"),
    [
        ("vector", "approximate nearest neighbour search over embeddings", "milvus.html"),
        ("keyword", "partition key isolates datasets", "milvus.html"),
        ("hybrid", "when are offsets committed", "kafka.md"),
        ("keyword", "关键词提取", "结巴.txt"),
        ("vector", "中文分词组件", "结巴.txt"),
        ("hybrid", "倒排索引", "结巴.txt"),
    ],
)
def test_search_finds_the_right_document(
    indexed: dict[str, Any], mode: str, query: str, expected: str
) -> None:
    hits = kb_json(
        indexed["home"], "search", query, "--dataset", "kb", "--mode", mode, "--top-k", "3"
    )
    assert hits, f"no hits for {query!r} in {mode} mode"
    assert Path(hits[0]["document"]).name == expected
    for h in hits:
        assert {"document", "index_node_id", "score", "content"} <= h.keys()


def test_search_is_isolated_by_dataset(indexed: dict[str, Any]) -> None:
    hits = kb_json(
        indexed["home"], "search", "partition key", "--dataset", "other", "--mode", "hybrid"
    )
    assert hits == []


def test_reindex_unchanged_folder_does_no_work(indexed: dict[str, Any]) -> None:
    home = indexed["home"]
    before = kb_json(home, "stats", "--dataset", "kb")
    again = kb_json(home, "index", str(indexed["docs"]), "--dataset", "kb")
    assert again["embedded"] == 0
    assert again["failed"] == 0 and again["completed"] == 4
    assert kb_json(home, "stats", "--dataset", "kb") == before


def test_forced_replay_hits_the_cache_only(indexed: dict[str, Any]) -> None:
    home = indexed["home"]
    before = kb_json(home, "stats", "--dataset", "kb")
    replay = kb_json(home, "index", str(indexed["docs"]), "--dataset", "kb", "--force")
    assert replay["published"] == 4
    assert replay["embedded"] == 0
    assert replay["completed"] == 4
    after = kb_json(home, "stats", "--dataset", "kb")
    assert after == before


def test_broken_document_ends_in_error_with_a_reason(tmp_path: Path) -> None:
    docs = tmp_path / "bad"
    docs.mkdir()
    (docs / "ok.txt").write_text("A perfectly fine document about stream processing.")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (docs / "empty.md").write_text("")
    home = tmp_path / "home"
    proc = kb(home, "index", str(docs), "--dataset", "bad", "--json", check=False)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["completed"] == 1 and summary["failed"] == 2
    rows = {Path(r["document"]).name: r for r in kb_json(home, "status", "--dataset", "bad")}
    assert rows["ok.txt"]["status"] == "completed"
    for name in ("broken.pdf", "empty.md"):
        assert rows[name]["status"] == "error"
        assert rows[name]["error"], f"{name} has no reason"
