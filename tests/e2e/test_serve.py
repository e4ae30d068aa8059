"""`kbstream serve` over real HTTP: examples/docs indexed through the harness
(tansu, SQLite, milvus-lite, the bundled model), the API under uvicorn on a
free loopback port in a thread, queried with httpx. Dify's external knowledge
API shape, its auth and dataset errors, score_threshold, metadata_condition,
every search mode, document status and the OpenAPI document."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
KEY = "test-key-" + uuid.uuid4().hex[:8]
DS = "docs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def base_url(tansu: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    from kbstream.api import create_app
    from kbstream.indexing import index_paths
    from tests.harness import Pipeline, make_settings

    home = tmp_path_factory.mktemp("serve")
    folder = home / "docs"
    shutil.copytree(REPO / "examples" / "docs", folder)
    prefix = f"t{uuid.uuid4().hex[:10]}."
    pipeline = Pipeline(make_settings(home, tansu, prefix)).start()
    try:
        summary = index_paths(pipeline.container, [folder], DS, timeout=180)
        assert (summary.completed, summary.failed) == (3, 0), summary
        pipeline.stop()  # the workers; the container (and its model) stays for the API
        port = _free_port()
        app = create_app(pipeline.container, api_key=KEY)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.1)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(30)
    finally:
        pipeline.close()


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as c:
        yield c


def retrieval(client: httpx.Client, query: str, **extra: Any) -> httpx.Response:
    setting = {"top_k": extra.pop("top_k", 5), "score_threshold": extra.pop("threshold", 0.0)}
    body = {"knowledge_id": DS, "query": query, "retrieval_setting": setting, **extra}
    return client.post("/retrieval", json=body)


def test_dify_retrieval_response_shape(client: httpx.Client) -> None:
    r = retrieval(client, "How does doc_hash make replays idempotent?")
    assert r.status_code == 200, r.text
    records = r.json()["records"]
    assert records
    for rec in records:
        assert set(rec) == {"content", "score", "title", "metadata"}
        assert isinstance(rec["content"], str) and rec["content"]
        assert 0.0 <= rec["score"] <= 1.0
        assert isinstance(rec["metadata"], dict)
        assert rec["metadata"]["title"] == rec["title"]
        assert rec["metadata"]["status"] == "completed"
    assert records[0]["title"] == "streaming-indexing.md"
    assert [r["score"] for r in records] == sorted((r["score"] for r in records), reverse=True)
    # a Chinese query leans on the keyword side and finds the Chinese page
    zh = retrieval(client, "结巴分词怎样提取关键词").json()["records"]
    assert zh and zh[0]["title"] == "关键词索引.txt"


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 403, 1001),
        ({"Authorization": "Basic abc"}, 403, 1001),
        ({"Authorization": "Bearer"}, 403, 1001),
        ({"Authorization": "Bearer not-the-key"}, 403, 1002),
    ],
)
def test_auth_errors(base_url: str, headers: dict[str, str], status: int, code: int) -> None:
    body = {"knowledge_id": DS, "query": "kafka", "retrieval_setting": {"top_k": 1}}
    r = httpx.post(f"{base_url}/retrieval", json=body, headers=headers)
    assert r.status_code == status
    assert r.json()["error_code"] == code and r.json()["error_msg"]


def test_unknown_dataset_is_2001(client: httpx.Client) -> None:
    r = client.post(
        "/retrieval",
        json={"knowledge_id": "no-such-dataset", "query": "x", "retrieval_setting": {"top_k": 1}},
    )
    assert r.status_code == 404
    assert r.json()["error_code"] == 2001
    assert (
        client.post("/v1/datasets/no-such-dataset/search", json={"query": "x"}).status_code == 404
    )


def test_score_threshold_drops_weaker_records(client: httpx.Client) -> None:
    query = "Kafka consumer groups and Milvus vector search"
    every = retrieval(client, query, top_k=10).json()["records"]
    assert len(every) >= 2
    scores = sorted(r["score"] for r in every)
    threshold = (scores[0] + scores[-1]) / 2
    kept = retrieval(client, query, top_k=10, threshold=threshold).json()["records"]
    assert 0 < len(kept) < len(every)
    assert all(r["score"] >= threshold for r in kept)


def test_metadata_condition(client: httpx.Client) -> None:
    cond = {
        "logical_operator": "and",
        "conditions": [{"name": ["title"], "comparison_operator": "end with", "value": ".html"}],
    }
    records = retrieval(client, "Kafka consumer groups", metadata_condition=cond).json()["records"]
    assert records and all(r["title"].endswith(".html") for r in records)
    either = {
        "logical_operator": "or",
        "conditions": [
            {"name": ["title"], "comparison_operator": "is", "value": "关键词索引.txt"},
            {"name": ["position"], "comparison_operator": "<", "value": 0},
        ],
    }
    records = retrieval(client, "kafka", metadata_condition=either).json()["records"]
    assert records and {r["title"] for r in records} == {"关键词索引.txt"}
    bad = {"conditions": [{"name": ["title"], "comparison_operator": "before", "value": "x"}]}
    r = retrieval(client, "kafka", metadata_condition=bad)
    assert r.status_code == 400
    assert r.json()["error_code"] == 400 and "before" in r.json()["error_msg"]


def test_scores_mean_relevance_at_difys_threshold(client: httpx.Client) -> None:
    """At 0.5 (what the README tells a Dify user to set) an off-topic question
    gets nothing and an on-topic one keeps its answer; before, every query got
    0.667, 0.656, ... whatever it asked."""
    assert retrieval(client, "recipe for chocolate cake").json()["records"]  # without a threshold
    for off_topic in ("recipe for chocolate cake", "who won the world cup in 2014", "红烧肉怎么做"):
        every = retrieval(client, off_topic).json()["records"]
        # (the Chinese question shares no word with the pages: no candidate at all)
        assert all(r["score"] < 0.5 for r in every), (off_topic, every[:1])
        assert retrieval(client, off_topic, threshold=0.5).json()["records"] == []
    kept = retrieval(client, "How does doc_hash make replays idempotent?", threshold=0.5)
    assert kept.json()["records"][0]["title"] == "streaming-indexing.md"
    zh = retrieval(client, "结巴分词怎样提取关键词", threshold=0.5).json()["records"]
    assert zh and zh[0]["title"] == "关键词索引.txt"


@pytest.mark.parametrize("mode", ["vector", "keyword", "hybrid"])
def test_search_in_each_mode(client: httpx.Client, mode: str) -> None:
    r = client.post(
        f"/v1/datasets/{DS}/search", json={"query": "doc_hash idempotency", "mode": mode}
    )
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits and all(h["metadata"]["mode"] == mode for h in hits)
    assert all(0.0 <= h["score"] <= 1.0 for h in hits)
    assert hits[0]["title"] == "streaming-indexing.md"


def test_datasets_and_document_status(client: httpx.Client) -> None:
    listed = client.get("/v1/datasets").json()
    assert {"dataset": DS, "documents": 3, "by_status": {"completed": 3}} in listed
    hit = client.post(f"/v1/datasets/{DS}/search", json={"query": "Milvus"}).json()["hits"][0]
    doc_id = hit["metadata"]["document_id"]
    row = client.get(f"/v1/datasets/{DS}/documents/{doc_id}").json()
    assert (row["document_id"], row["status"]) == (doc_id, "completed")
    assert client.get(f"/v1/datasets/{DS}/documents/nope").status_code == 404


def test_openapi_and_health(base_url: str, client: httpx.Client) -> None:
    assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
    # the API's documentation is behind the key unless the operator opens it
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(f"{base_url}{path}").status_code == 403, path
        assert client.get(path).status_code == 200, path
    spec = client.get("/openapi.json").json()
    assert {"/retrieval", "/v1/datasets", "/v1/datasets/{dataset}/search"} <= set(spec["paths"])


def test_a_query_over_the_limit_is_a_clear_400(client: httpx.Client) -> None:
    r = retrieval(client, "kafka " * 1000)  # 6,000 characters, the limit is 4,000
    assert r.status_code == 400
    assert "KBSTREAM_MAX_QUERY_CHARS" in r.json()["error_msg"]
    r = client.post(f"/v1/datasets/{DS}/search", json={"query": "x" * 4001})
    assert r.status_code == 400
    # a megabyte is refused before it is read
    r = retrieval(client, "kafka " * 200_000)
    assert r.status_code == 413 and r.json()["error_code"] == 413


# -- Dify's own client (tests/dify_client.py, ported from Dify's source) --------------


def dify(
    base_url: str,
    query: str = "Kafka consumer groups, Milvus vectors and jieba keywords",
    condition: Any = None,
    endpoint: str | None = None,
    **params: Any,
) -> list[dict[str, Any]]:
    from tests.dify_client import fetch_external_knowledge_retrieval

    return fetch_external_knowledge_retrieval(
        endpoint or base_url, KEY, DS, query, {"top_k": 10, **params}, condition
    )


def _cond(name: str, op: str, value: Any, logical: str | None = "and") -> Any:
    from tests.dify_client import Condition, MetadataCondition

    c = Condition(name=name, comparison_operator=op, value=value)  # type: ignore[arg-type]
    return MetadataCondition(logical_operator=logical, conditions=[c])  # type: ignore[arg-type]


TITLES = {"streaming-indexing.md", "vector-search.html", "关键词索引.txt"}


@pytest.mark.parametrize(
    ("name", "op", "value", "titles"),
    [
        (
            "title",
            "in",
            ["streaming-indexing.md", "关键词索引.txt"],
            {"streaming-indexing.md", "关键词索引.txt"},
        ),
        (
            "document_name",
            "in",
            "vector-search.html, 关键词索引.txt",
            {"vector-search.html", "关键词索引.txt"},
        ),
        ("title", "not in", ["streaming-indexing.md"], {"vector-search.html", "关键词索引.txt"}),
        ("title", "not in", "streaming-indexing.md,vector-search.html", {"关键词索引.txt"}),
        ("last_update_date", "before", 4_102_444_800, TITLES),  # 2100
        ("last_update_date", "after", 946_684_800, TITLES),  # 2000
        ("last_update_date", "after", 4_102_444_800, set()),
        ("title", "is not", "vector-search.html", {"streaming-indexing.md", "关键词索引.txt"}),
        ("title", "not contains", ".md", {"vector-search.html", "关键词索引.txt"}),
        # a field no document has is SQL NULL in Dify: these match nothing
        ("author", "not contains", "x", set()),
        ("author", "is not", "x", set()),
        ("author", "empty", None, TITLES),
        ("doc_form", "is", "text", TITLES),
        ("position", "≥", 0, TITLES),
    ],
)
def test_every_dify_operator_through_difys_client(
    base_url: str, client: httpx.Client, name: str, op: str, value: Any, titles: set[str]
) -> None:
    cond = _cond(name, op, value)
    records = dify(base_url, condition=cond)
    assert {r["title"] for r in records} == titles, (name, op, value, records[:1])
    # Dify turns every non-200 into no records: an empty answer must be a 200
    body = {
        "knowledge_id": DS,
        "query": "kafka",
        "retrieval_setting": {"top_k": 10, "score_threshold": 0.0},
        "metadata_condition": cond.model_dump(),
    }
    assert client.post("/retrieval", json=body).status_code == 200


def test_what_dify_sends_as_null(base_url: str) -> None:
    from tests.dify_client import MetadataCondition

    assert dify(base_url, top_k=None)  # Top K unset
    nulls = MetadataCondition(logical_operator=None, conditions=None)
    assert dify(base_url, condition=nulls)
    # null logical_operator is Dify's "or"
    from tests.dify_client import Condition

    either = MetadataCondition(
        logical_operator=None,
        conditions=[
            Condition(name="title", comparison_operator="is", value="vector-search.html"),
            Condition(name="title", comparison_operator="is", value="关键词索引.txt"),
        ],
    )
    assert {r["title"] for r in dify(base_url, condition=either)} == {
        "vector-search.html",
        "关键词索引.txt",
    }


def test_an_endpoint_saved_with_a_trailing_slash_works(base_url: str) -> None:
    assert dify(base_url, endpoint=base_url + "/")  # Dify asks for //retrieval


def test_records_are_what_dify_uses_and_hold_no_server_paths(base_url: str) -> None:
    from tests.dify_client import external_documents

    records = dify(base_url)
    docs = external_documents(records)
    assert docs and all(d["page_content"] and 0.0 <= d["metadata"]["score"] <= 1.0 for d in docs)
    for r in records:
        meta = r["metadata"]
        assert meta["source"] == meta["document_name"] == r["title"] in TITLES
        assert not any(isinstance(v, str) and v.startswith("/") for v in meta.values()), meta
        assert "path" not in meta


def test_serve_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBSTREAM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "kbstream.cli", "serve", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "KBSTREAM_API_KEY" in proc.stderr


def test_document_and_segment_operations_are_published(client: httpx.Client, base_url: str) -> None:
    """Issue 19: each operation endpoint publishes its lifecycle event and
    answers 202 with its id at once (the stages are stopped here: nothing
    applies it, which test_dify_operations checks through `up`)."""
    hit = client.post(f"/v1/datasets/{DS}/search", json={"query": "Milvus"}).json()["hits"][0]
    doc = f"/v1/datasets/{DS}/documents/{hit['metadata']['document_id']}"
    r = client.post(f"{doc}/disable")
    assert r.status_code == 202 and r.json()["type"] == "document.disabled", r.text
    assert r.json()["event_id"]
    node = {"index_node_id": hit["metadata"]["index_node_id"]}
    r = client.post(f"{doc}/segments/enable", json=node)
    assert (r.status_code, r.json()["type"]) == (202, "segment.enabled"), r.text
    r = client.post(f"{doc}/segments/update", json={**node, "content": "new text"})
    assert (r.status_code, r.json()["type"]) == (202, "segment.updated"), r.text
    assert client.post(f"{doc}/segments/disable", json={}).status_code == 422
    assert client.post(f"{doc}/hide").status_code == 422
    assert httpx.post(f"{base_url}{doc}/archive").status_code == 403  # no key
    r = client.delete("/v1/datasets/never-indexed")
    assert (r.status_code, r.json()["type"]) == (202, "dataset.deleted"), r.text
