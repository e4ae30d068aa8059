"""Keyword (BM25) statistics are the dataset's whenever its texts arrived
(issue 18): through the real CLI, each `kbstream index` one run, so each run's
texts sit in their own milvus-lite segment. A sentence edited into a document
indexed earlier is the top keyword hit for its own words, and documents indexed
one run at a time are each the top hit for their rare word. With per-segment
statistics the edited segment scored its words' idf as if it were alone
(ln(4/3) = 0.29) and ranked below old text sharing two of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kbstream.bootstrap import Container
from kbstream.search import search
from kbstream.settings import Settings
from tests.e2e.test_index_and_search import kb_json

pytestmark = pytest.mark.e2e

TOPICS = ["offsets", "partitions", "replicas", "brokers"]


def handbook(edited: bool) -> str:
    """Twelve short paragraphs; each topic word is in three of them. The edited
    paragraph (7) is the only one that names all four."""
    paragraphs = [
        f"Paragraph {i} explains how the {TOPICS[i % 4]} and the {TOPICS[(i + 1) % 4]} of "
        f"a cluster behave during maintenance number {i}."
        for i in range(12)
    ]
    paragraphs[7] = (
        "The new runbook rebalances offsets, partitions, replicas and brokers together."
        if edited
        else "Paragraph seven is about something else entirely, lunch menus."
    )
    return "\n\n".join(paragraphs) + "\n"


def published(summary: dict[str, Any]) -> int:
    assert summary["failed"] == 0, summary
    return int(summary["published"])


def keyword_top(c: Container, query: str) -> list[str]:
    return [h.content for h in search(c, "kb", query, "keyword", 3)]


def test_late_text_ranks_by_the_whole_datasets_statistics(tmp_path: Path) -> None:
    docs, home = tmp_path / "docs", tmp_path / "home"
    docs.mkdir()
    # one paragraph a segment (about 25 tokens each)
    options = ("--dataset", "kb", "--max-tokens", "40", "--chunk-overlap", "0")
    (docs / "handbook.md").write_text(handbook(edited=False))
    (docs / "a.md").write_text("The quokka guide covers offsets and partitions.")
    assert published(kb_json(home, "index", str(docs), *options)) == 2
    (docs / "handbook.md").write_text(handbook(edited=True))
    (docs / "b.md").write_text("The axolotl guide covers offsets and partitions.")
    assert published(kb_json(home, "index", str(docs), *options)) == 2  # handbook updated
    (docs / "c.md").write_text("The pangolin guide covers offsets and partitions.")
    assert published(kb_json(home, "index", str(docs), *options)) == 1

    # searched in this process, as `kbstream search` would (one container, not four CLIs)
    c = Container(Settings(home=home))
    try:
        hits = keyword_top(c, "offsets partitions replicas brokers")
        assert "new runbook" in hits[0], hits
        for word in ("quokka", "axolotl", "pangolin"):
            hits = keyword_top(c, f"{word} offsets partitions")
            assert word in hits[0], (word, hits)
    finally:
        c.close()
