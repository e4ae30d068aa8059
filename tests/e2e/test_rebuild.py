"""`kbstream rebuild` and the blue/green model switch, end to end: the
examples indexed by an in-process pipeline (real tansu, SQLite, milvus-lite,
the real model), then a rebuild of the unchanged dataset, a lost collection
brought back, and a switch to a second model (the bundled one with max
pooling: another fingerprint, other vectors, same dimension) and back."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from infra.embedding import BUNDLED_MODEL_NAME, bundled_model_dir
from kbstream.bootstrap import Container
from kbstream.cli import app
from kbstream.indexing import index_paths
from kbstream.rebuild import index_rows, rebuild
from kbstream.search import search
from kbstream.serving import search_index
from kbstream.verify import verify
from tests.harness import Pipeline, make_settings

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "docs"
DS = "demo"
QUERY = "how is the same text kept from being embedded twice"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, tansu: str) -> Iterator[Pipeline]:
    home = tmp_path_factory.mktemp("rebuild") / "home"
    settings = make_settings(home, tansu, f"t{uuid.uuid4().hex[:10]}.")
    p = Pipeline(settings).start()
    try:
        summary = index_paths(p.container, [EXAMPLES], DS, timeout=180)
        assert summary.completed == 3 and summary.failed == 0
        yield p
    finally:
        p.close()


def kb(p: Pipeline, *args: str, code: int = 0) -> str:
    """The CLI in this process (a second process could not open the milvus-lite file)."""
    s = p.settings
    env = {
        "KBSTREAM_HOME": str(s.home),
        "KBSTREAM_BROKERS": s.brokers,
        "KBSTREAM_MILVUS_URI": s.vector_uri,
        "KBSTREAM_TOPIC_PREFIX": s.topic_prefix,
    }
    res = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res.stdout


def counts(c: Container) -> dict[str, int]:
    tenant = c.settings.tenant
    store, _ = search_index(c, DS)
    with c.uow(readonly=True) as uow:
        return {
            "segments": uow.segments.count(tenant, DS),
            "vectors": len(store.ids(tenant, DS)),
            "keyword_entities": c.keyword_index.count(tenant, DS),
            "cache": uow.embeddings.count(),
        }


def states(c: Container) -> dict[str, str]:
    return {str(r["model"]): str(r["state"]) for r in index_rows(c, DS)}


def test_rebuild_of_an_unchanged_dataset_calls_no_model(pipeline: Pipeline) -> None:
    c = pipeline.container
    before = counts(c)
    assert before["segments"] > 0 and before == {**before, "vectors": before["segments"]}
    summary = json.loads(kb(pipeline, "rebuild", "--dataset", DS, "--json"))
    assert summary["in_place"] is True
    assert summary["embedded"] == 0 and summary["cache_hits"] == before["segments"]
    assert summary["segments"] == summary["vectors_written"] == before["segments"]
    assert counts(c) == before  # vectors, keyword entities and the cache alike
    report = verify(c, DS)
    assert report.drift == [] and report.hint is None


def test_a_lost_collection_comes_back_with_one_command(pipeline: Pipeline) -> None:
    c = pipeline.container
    before = counts(c)
    c.vectors.client.drop_collection(c.vectors.collection)  # the Milvus volume is gone
    out = kb(pipeline, "verify", "--dataset", DS, code=1)
    assert f"run: kbstream rebuild --dataset {DS}" in out
    summary = json.loads(kb(pipeline, "rebuild", "--dataset", DS, "--json"))
    assert summary["embedded"] == 0 and summary["vectors_written"] == before["segments"]
    assert counts(c) == before
    assert "no drift" in kb(pipeline, "verify", "--dataset", DS)
    assert search(c, DS, QUERY, "vector", 3)


def max_pooling_copy(root: Path) -> Path:
    folder = root / "minilm-max"
    shutil.copytree(bundled_model_dir(), folder)
    config = folder / "1_Pooling" / "config.json"
    pooling = json.loads(config.read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    config.write_text(json.dumps(pooling))
    return folder


def test_a_model_switch_is_blue_green_and_switching_back_embeds_nothing(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    c = pipeline.container
    tenant = c.settings.tenant
    old = c.vectors.collection
    segments = counts(c)["segments"]
    copy = max_pooling_copy(tmp_path)
    seen: list[dict[str, Any]] = []

    def during(done: int, total: int) -> None:
        # mid-build: the alias and search still use the old model's collection
        seen.append(
            {
                "alias": c.vectors.alias_target(tenant, DS),
                "hits": len(search(c, DS, QUERY, "vector", 3)),
                "states": states(c),
                "done": done,
            }
        )

    summary = rebuild(c, DS, str(copy), progress=during)
    assert seen and all(s["alias"] == old and s["hits"] > 0 for s in seen)
    assert all(sorted(s["states"].values()) == ["building", "serving"] for s in seen)
    assert summary.in_place is False and summary.retired is not None
    assert summary.embedded > 0  # a new model: its own cache entries
    new = summary.collection
    assert new != old and c.vectors.alias_target(tenant, DS) == new
    rows = {str(r["state"]): r for r in index_rows(c, DS)}
    assert rows["serving"]["collection"] == new and rows["retired"]["collection"] == old
    assert rows["retired"]["drop_after"] is not None
    assert rows["serving"]["progress_done"] == rows["serving"]["progress_total"] == segments
    store, provider = search_index(c, DS)
    assert provider.model == summary.model and provider.model != c.provider.model
    node = next(iter(store.ids(tenant, DS)))
    old_vec = c.vectors.vectors([node])[node]
    assert store.vectors([node])[node] != pytest.approx(old_vec, abs=1e-3)  # other vectors
    hits = search(c, DS, QUERY, "vector", 3)
    assert hits and (hits[0].raw_score or 0) > 0  # the new model's cosine
    assert "serving" in kb(pipeline, "status", "--dataset", DS)
    assert verify(c, DS).drift == []

    cache = counts(c)["cache"]
    back = json.loads(
        kb(pipeline, "rebuild", "--dataset", DS, "--model", BUNDLED_MODEL_NAME, "--json")
    )
    assert back["embedded"] == 0 and counts(c)["cache"] == cache
    assert c.vectors.alias_target(tenant, DS) == old
    assert sorted(states(c).values()) == ["retired", "serving"]

    dropped = json.loads(
        kb(pipeline, "rebuild", "--dataset", DS, "--drop-retired", "--now", "--json")
    )
    assert [d["collection"] for d in dropped["dropped"]] == [new]
    assert dropped["dropped"][0]["collection_dropped"] is True
    assert not c.vectors.has_collection(new)
    assert list(states(c).values()) == ["serving"]
    assert search(c, DS, QUERY, "vector", 3) and verify(c, DS).drift == []


def test_a_rebuild_keeps_a_disabled_document_out(pipeline: Pipeline) -> None:
    """Issue 19: a lost collection rebuilt while a document is disabled comes
    back without it (vectors and keyword entities); enabled again, it returns
    from the cache."""
    from domain.documents import DocKey
    from kbstream.operations import switch_documents

    c = pipeline.container
    with c.uow(readonly=True) as uow:
        doc = uow.documents.list(c.settings.tenant, DS)[0]
        mine = uow.segments.ids_for_document(doc.key)
    (off,) = switch_documents(c, DS, [doc.document_id], "disable", timeout=120)
    assert not off.enabled and off.status.value == "completed"
    before = counts(c)
    c.vectors.client.drop_collection(c.vectors.collection)
    summary = json.loads(kb(pipeline, "rebuild", "--dataset", DS, "--json"))
    assert summary["embedded"] == 0
    store, _ = search_index(c, DS)
    assert mine and not mine & set(store.ids(c.settings.tenant, DS))
    assert not c.keyword_index.ids_for_document(DocKey(c.settings.tenant, DS, doc.document_id))
    assert counts(c) == before
    assert verify(c, DS).drift == []
    switch_documents(c, DS, [doc.document_id], "enable", timeout=120)
    assert mine <= set(store.ids(c.settings.tenant, DS))
    assert counts(c)["cache"] == before["cache"]
