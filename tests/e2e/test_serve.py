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


def test_openapi_and_health(base_url: str) -> None:
    assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
    spec = httpx.get(f"{base_url}/openapi.json").json()
    assert {"/retrieval", "/v1/datasets", "/v1/datasets/{dataset}/search"} <= set(spec["paths"])


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
