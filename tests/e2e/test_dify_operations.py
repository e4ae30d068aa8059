"""Issue 19 through a running `kbstream up`, every operation published from
another process by its CLI verb: a disabled document leaves both searches
and comes back without embedding anything; a disabled segment likewise; an
edited segment is found by its new text only; an archived document refuses
an update (status says why) until unarchived; a deleted dataset leaves no
text of it in the database."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_up_and_cli import KBSTREAM, REPO, kb, running_up, scrubbed_env, write_docs
from tests.polling import poll

# about 30 CLI processes, each importing kbstream: 10 minutes on 2 busy cores
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

DOCS = {
    "kafka.md": "# Kafka\n\nThe zorblax broker keeps partitions in order for every consumer.",
    "milvus.txt": "Milvus stores the quintaflor vectors beside their index node ids.",
}
WORDS = ("zorblax", "quintaflor", "plimsovar")


def test_dify_operations_beside_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    env = scrubbed_env()

    def cli(*args: str, rc: int = 0) -> Any:
        return kb(*args, "--home", str(home), cwd=REPO, env=env, rc=rc)

    def search(query: str) -> list[dict[str, Any]]:
        # keyword mode: no model to load in each CLI process; every mode resolves
        # its hits through the same searchable rows (tests/unit/test_stage_switches.py)
        hits: list[dict[str, Any]] = cli("search", query, "--dataset", "notes", "--mode", "keyword")
        return hits

    with running_up(home):
        summary = cli("index", str(docs), "--dataset", "notes")
        assert summary["completed"] == 2, summary
        ids = {Path(r["document"]).name: r["document_id"] for r in cli("status", "-d", "notes")}
        kafka = ids["kafka.md"]
        (hit,) = [h for h in search("zorblax") if h["document_id"] == kafka]

        # document.disabled: out of keyword and vector search, rows and cache stay
        (row,) = cli("document", "disable", kafka, "--dataset", "notes")
        assert (row["enabled"], row["status"]) == (False, "completed"), row
        assert not [h for h in search("zorblax") if h["document_id"] == kafka]
        # the row stays, the vector and keyword entity go (verify counts what is searchable)
        stats = cli("stats", "--dataset", "notes")
        assert (stats["segments"], stats["vectors"], stats["keyword_entities"]) == (2, 1, 1)
        cached = stats["cached_embeddings"]  # a disable drops nothing from the cache
        report = cli("verify", "--dataset", "notes")
        assert report["clean"] and report["segments"] == report["vectors"] == 1, report
        # document.enabled: back, from the cache
        (row,) = cli("document", "enable", kafka, "--dataset", "notes")
        assert (row["enabled"], row["status"]) == (True, "completed"), row
        assert [h for h in search("zorblax") if h["document_id"] == kafka]
        assert cli("stats", "--dataset", "notes")["cached_embeddings"] == cached

        # segment.disabled / enabled by index_node_id
        node = hit["index_node_id"]
        seg = ["--dataset", "notes", "--document", kafka, "--index-node-id", node]
        cli("segment", "disable", *seg)
        assert not search("zorblax")
        cli("segment", "enable", *seg)
        assert search("zorblax")

        # segment.updated: the new text is found, the old one is not
        (row,) = cli("segment", "update", *seg, "--content", "The plimsovar broker replaced it.")
        assert row["status"] == "completed", row
        (edited,) = search("plimsovar")
        assert edited["document_id"] == kafka and edited["index_node_id"] != node
        assert not search("zorblax")
        assert cli("verify", "--dataset", "notes")["clean"]

        # document.archived: out of search, an update refused with the reason shown
        (row,) = cli("document", "archive", kafka, "--dataset", "notes")
        assert row["archived"] and not search("plimsovar")
        update = {
            "type": "document.updated",
            "dataset_id": "notes",
            "document_id": kafka,
            "source": "kafka.md",
            "content": "An update while archived.",
        }
        subprocess.run(
            [KBSTREAM, "publish", "--home", str(home)],
            input=json.dumps(update),
            text=True,
            env=env,
            cwd=REPO,
            check=True,
            timeout=120,
        )

        def refused() -> dict[str, Any] | None:
            doc: dict[str, Any] = cli("status", "-d", "notes", "--document", kafka)
            return doc if "archived" in (doc["last_dropped"] or "") else None

        assert poll(lambda: refused() is not None, 120)
        # `index` of its changed file fails at once with the reason, publishing nothing
        (docs / "kafka.md").write_text("# Kafka\n\nChanged while archived.")
        summary = cli("index", str(docs), "--dataset", "notes", rc=1)
        assert summary["published"] == 0 and "archived" in summary["errors"][0]["error"]
        (row,) = cli("document", "unarchive", kafka, "--dataset", "notes")
        assert (row["archived"], row["version"], row["status"]) == (False, 1, "completed")

        # dataset.deleted: every document goes, and no text of it stays
        report = cli("dataset", "delete", "--dataset", "notes")
        assert sorted(report["documents"]) == sorted(ids.values()), report
        assert report["remaining"] == [], report
        stats = cli("stats", "--dataset", "notes")
        assert (stats["documents"], stats["segments"], stats["vectors"]) == (0, 0, 0), stats
        assert stats["keyword_entities"] == 0, stats
    assert _database_texts(home / "kbstream.db", WORDS) == []


def _database_texts(path: Path, words: tuple[str, ...]) -> list[str]:
    """Every table cell of the database that holds one of ``words``."""
    found = []
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):
                for cell in row:
                    text = cell.decode(errors="replace") if isinstance(cell, bytes) else str(cell)
                    if any(w in text for w in words):
                        found.append(f"{table}: {text[:80]}")
    return found
