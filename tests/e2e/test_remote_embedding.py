"""Indexing through the openai provider: the in-process pipeline (real tansu broker,
SQLite, milvus-lite) embeds over HTTP with tests/embedding_server.py on loopback,
which serves the REAL bundled all-MiniLM-L6-v2 through sentence-transformers.

The split stage has no model files here (no KBSTREAM_TOKENIZER): it measures chunks
with the documented estimate. The vectors must equal the local provider's, and a 429
storm must end with every document completed, every text embedded once and no dead
letter."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from domain.documents import DocKey, IndexingStatus
from domain.token_estimate import ApproximateTokenCounter
from infra.embedding import ModelTokenCounter, SentenceTransformerProvider, resolve_model
from kbstream.dlq import list_dead_letters
from kbstream.indexing import index_paths
from tests.embedding_server import EmbeddingServer, real_model_backend
from tests.harness import Pipeline, make_settings

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "docs"


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer(real_model_backend()) as s:
        yield s


@pytest.fixture(scope="module")
def pipeline(
    tmp_path_factory: pytest.TempPathFactory, tansu: str, server: EmbeddingServer
) -> Iterator[Pipeline]:
    home = tmp_path_factory.mktemp("remote")
    settings = make_settings(
        home,
        tansu,
        f"r{uuid.uuid4().hex[:10]}.",
        embedding_provider="openai",
        embedding_base_url=server.base_url,
        embedding_model="all-MiniLM-L6-v2",
        embedding_dimensions=384,
        embedding_api_key="sk-loopback",
        embedding_max_input_tokens=254,  # the served model's input, as a user would set it
        embedding_batch_size=4,
        embedding_max_concurrency=3,
        retry_max_seconds=2.0,
    )
    with Pipeline(settings) as p:
        yield p


def segments_of(p: Pipeline, dataset: str, document_ids: list[str]) -> dict[str, str]:
    """doc_hash -> content of every segment of these documents."""
    with p.container.uow(readonly=True) as uow:
        ids = set().union(
            *(uow.segments.ids_for_document(DocKey(p.tenant, dataset, d)) for d in document_ids)
        )
        return {s.doc_hash: s.content for s in uow.segments.by_ids(sorted(ids)).values()}


def completed_ids(p: Pipeline, dataset: str, expected: int) -> list[str]:
    with p.container.uow(readonly=True) as uow:
        docs = uow.documents.list(p.tenant, dataset)
    assert len(docs) == expected
    assert all(d.status is IndexingStatus.COMPLETED and not d.error for d in docs), docs
    return [d.key.document_id for d in docs]


def test_vectors_equal_the_local_providers(pipeline: Pipeline, server: EmbeddingServer) -> None:
    assert isinstance(pipeline.container.token_counter, ApproximateTokenCounter)
    summary = index_paths(pipeline.container, [EXAMPLES], "remote", timeout=180)
    assert (summary.completed, summary.failed) == (3, 0), summary
    segments = segments_of(pipeline, "remote", completed_ids(pipeline, "remote", 3))
    assert len(segments) == summary.segments
    # the estimate kept every chunk within the served model's input
    exact = ModelTokenCounter(resolve_model(None)[1])
    assert all(exact.count_tokens(t) <= 254 for t in segments.values())

    provider, model, _ = pipeline.container.model_identity
    with pipeline.container.uow(readonly=True) as uow:
        cached = uow.embeddings.get_many(
            pipeline.container.settings.tenant, provider, model, segments
        )
    assert set(cached) == set(segments)
    hashes = sorted(segments)
    local = np.asarray(SentenceTransformerProvider().embed([segments[h] for h in hashes]))
    remote = np.asarray([cached[h] for h in hashes])
    cosines = np.sum(local * remote, axis=1) / (
        np.linalg.norm(local, axis=1) * np.linalg.norm(remote, axis=1)
    )
    assert cosines.min() >= 0.999, cosines
    assert all(server.stats.texts[t] == 1 for t in segments.values())
    assert server.stats.authorization == "Bearer sk-loopback"


def storm_corpus(root: Path, nonce: str) -> Path:
    folder = root / f"storm-{nonce}"
    folder.mkdir()
    for d in range(6):
        paragraphs = [
            f"Report {nonce} part {d}.{i}: the {['broker', 'cache', 'splitter', 'index'][i % 4]} "
            f"answered request {d * 10 + i} after {i + 1} retries, and the operator wrote it "
            "down so that the next shift would know what to expect from the service."
            for i in range(8)
        ]
        (folder / f"report-{d}.md").write_text("\n\n".join(paragraphs))
    return folder


def test_a_429_storm_completes_every_document_once(
    pipeline: Pipeline, server: EmbeddingServer, tmp_path: Path
) -> None:
    nonce = uuid.uuid4().hex[:8]
    folder = storm_corpus(tmp_path, nonce)
    server.reset_stats()
    # 60% of requests refused for the whole run: some batches may exhaust the
    # provider's attempts, and the stage then retries the event
    server.set_faults(status=429, fraction=0.6, retry_after="0.2")
    try:
        summary = index_paths(pipeline.container, [folder], "storm", timeout=240)
    finally:
        injected = server.stats.injected[429]
        server.set_faults()
    assert (summary.completed, summary.failed) == (6, 0), summary
    assert injected >= server.stats.ok_requests // 2 > 0  # the storm happened
    segments = segments_of(pipeline, "storm", completed_ids(pipeline, "storm", 6))
    # every text reached the model once: no batch lost, none embedded twice
    assert {t: server.stats.texts[t] for t in segments.values()} == {
        t: 1 for t in segments.values()
    }
    assert summary.embedded == len(segments)
    assert list_dead_letters(pipeline.settings.brokers or "", pipeline.container.topics) == []
