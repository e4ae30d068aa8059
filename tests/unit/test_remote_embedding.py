"""OpenAICompatibleProvider against tests/embedding_server.py on loopback, serving
the named HashingEmbeddingDouble (fast): batching, ordering by ``index``, retries of
the failed batch alone, 429 storms, permanent refusals, identity and configuration,
and the split stage's token counter for a remote model."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from domain.errors import PermanentError, TransientError
from domain.token_estimate import ApproximateTokenCounter, estimate_tokens
from infra.embedding import ModelTokenCounter, model_identity, resolve_model
from infra.remote_embedding import (
    OpenAICompatibleProvider,
    RemoteConfig,
    TokenizerFileCounter,
    remote_config,
    remote_identity,
)
from infra.vectors import collection_name
from kbstream.bootstrap import Container
from kbstream.settings import Settings
from tests.embedding_server import EmbeddingServer, double_backend
from tests.fakes import HashingEmbeddingDouble

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"segment number {i} about {topic}" for i, topic in enumerate("abcdefghijklmnopqrst")]


@pytest.fixture
def server() -> Iterator[EmbeddingServer]:
    with EmbeddingServer(double_backend()) as s:
        yield s


def config_for(server: EmbeddingServer, **overrides: object) -> RemoteConfig:
    base = RemoteConfig(
        base_url=server.base_url,
        model="hashing-double",
        dimensions=HashingEmbeddingDouble.dim,
        api_key="sk-test",
        batch_size=4,
        max_concurrency=3,
        requests_per_minute=0,
        tokens_per_minute=0,
        backoff_seconds=0.005,
        max_backoff_seconds=0.02,
        max_attempts=8,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def provider_for(server: EmbeddingServer, **overrides: object) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(config_for(server, **overrides), ApproximateTokenCounter(512))


def expected(texts: list[str]) -> list[list[float]]:
    return HashingEmbeddingDouble().embed(texts)


def test_batches_concurrently_and_orders_by_index(server: EmbeddingServer) -> None:
    server.set_faults(shuffle=True)  # data comes back out of order
    provider = provider_for(server)
    vectors = provider.embed(TEXTS[:10])
    assert np.allclose(vectors, expected(TEXTS[:10]), atol=1e-6)
    assert sorted(server.stats.batch_sizes) == [2, 4, 4]
    assert server.stats.authorization == "Bearer sk-test"
    assert provider.embed([]) == []


class CountingCounter(ApproximateTokenCounter):
    def __init__(self) -> None:
        super().__init__(512)
        self.counted: list[str] = []

    def count_tokens(self, text: str) -> int:
        self.counted.append(text)
        return super().count_tokens(text)

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        return [self.count_tokens(t) for t in texts]


def test_texts_are_counted_only_for_a_tokens_per_minute_limit(server: EmbeddingServer) -> None:
    """The split stage counted every text already: the provider counts again
    only what a tokens-per-minute budget needs (issue 17)."""
    free = CountingCounter()
    OpenAICompatibleProvider(config_for(server), free).embed(TEXTS[:6])
    assert free.counted == []
    limited = CountingCounter()
    OpenAICompatibleProvider(config_for(server, tokens_per_minute=10**6), limited).embed(TEXTS[:6])
    assert sorted(limited.counted) == sorted(TEXTS[:6])


def test_vectors_are_unit_length(server: EmbeddingServer) -> None:
    server.encode, server.dim = (lambda texts: np.full((len(texts), 16), 3.0)), 16
    vectors = np.asarray(provider_for(server).embed(["a", "b"]))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_a_429_storm_ends_with_every_text_embedded_once(server: EmbeddingServer) -> None:
    server.set_faults(status=429, fraction=0.6, count=25, retry_after="0.01")
    # more attempts than injected 429s: the storm cannot exhaust one batch's tries
    provider = provider_for(server, batch_size=2, max_attempts=26)
    vectors = provider.embed(TEXTS)
    assert np.allclose(vectors, expected(TEXTS), atol=1e-6)
    assert server.stats.injected[429] == 25
    assert server.stats.texts == {t: 1 for t in TEXTS}


@pytest.mark.parametrize("status", [500, 503, 408])
def test_a_failed_batch_is_retried_alone(server: EmbeddingServer, status: int) -> None:
    server.set_faults(status=status, fraction=1.0, count=1, retry_after=None)
    vectors = provider_for(server).embed(TEXTS[:12])
    assert np.allclose(vectors, expected(TEXTS[:12]), atol=1e-6)
    assert server.stats.requests == 4  # three batches, one of them twice
    assert server.stats.texts == {t: 1 for t in TEXTS[:12]}


def test_gives_up_transiently_and_keeps_what_it_got(server: EmbeddingServer) -> None:
    server.set_faults(status=503, fraction=1.0, count=1, retry_after=None)
    provider = provider_for(server, max_attempts=1)
    with pytest.raises(TransientError, match="503"):
        provider.embed(TEXTS[:12])
    assert server.stats.ok_requests == 2  # the other two batches were answered
    # the stage retries the event: only the failed batch goes out again
    vectors = provider.embed(TEXTS[:12])
    assert np.allclose(vectors, expected(TEXTS[:12]), atol=1e-6)
    assert server.stats.texts == {t: 1 for t in TEXTS[:12]}


@pytest.mark.parametrize("header", ["3600", "inf", "Infinity", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_a_retry_after_beyond_the_cap_fails_at_once_and_pauses_only_up_to_the_cap(
    server: EmbeddingServer, header: str
) -> None:
    """Issue 20 item 8: a 429 with ``Retry-After: 3600`` paused every later call for
    an hour, and ``inf`` raised OverflowError on every call until restart."""
    server.set_faults(status=429, fraction=1.0, count=1, retry_after=header)
    provider = provider_for(server, max_concurrency=1, max_retry_after_seconds=0.05)
    slept: list[float] = []
    provider.limiter.sleep = slept.append  # waits are recorded, not taken
    with pytest.raises(TransientError, match=r"above the 0.05 s cap"):
        provider.embed(["one"])
    assert server.stats.requests == 1  # not retried in the call: the stage backs off
    assert 0 < provider.limiter.paused_for <= 0.05
    # the next call waits out at most the capped pause, then goes through
    assert np.allclose(provider.embed(["one"]), expected(["one"]), atol=1e-6)
    assert slept and max(slept) <= 0.05


def test_the_cap_comes_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        embedding_provider="openai",
        embedding_model="m",
        embedding_dimensions=16,
        embedding_max_retry_after_seconds=5,
    )
    assert remote_config(settings).max_retry_after_seconds == 5


@pytest.mark.parametrize(
    ("faults", "match"),
    [
        ({"mangle": "count"}, "3 vectors with indexes .* for 4 inputs"),
        ({"mangle": "dimension"}, "not 16-dimensional"),
        ({"status": 401, "fraction": 1.0, "retry_after": None}, "HTTP 401"),
        ({"status": 400, "fraction": 1.0, "retry_after": None}, "HTTP 400"),
    ],
)
def test_wrong_answers_are_permanent(
    server: EmbeddingServer, faults: dict[str, object], match: str
) -> None:
    server.set_faults(**faults)
    with pytest.raises(PermanentError, match=match):
        provider_for(server).embed(TEXTS[:4])
    assert server.stats.requests == 1  # not retried


def test_dimensions_are_sent_only_when_asked(server: EmbeddingServer) -> None:
    # this server refuses a `dimensions` it cannot produce, as OpenAI does for ada-002
    with pytest.raises(PermanentError, match="KBSTREAM_EMBEDDING_DIMENSIONS"):
        provider_for(server, dimensions=8).embed(["x"])  # not sent: the answer is 16 wide
    with pytest.raises(PermanentError, match="HTTP 400"):
        provider_for(server, dimensions=8, send_dimensions=True).embed(["x"])
    assert len(provider_for(server, send_dimensions=True).embed(["x"])[0]) == 16


def test_connection_errors_are_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    config = RemoteConfig(
        base_url=f"http://127.0.0.1:{port}/v1",
        model="m",
        dimensions=16,
        max_attempts=2,
        backoff_seconds=0.001,
        max_backoff_seconds=0.01,
    )
    with pytest.raises(TransientError, match="ConnectError"):
        OpenAICompatibleProvider(config, ApproximateTokenCounter(64)).embed(["x"])


# -- identity and configuration ----------------------------------------------------------


def test_identity_names_the_service_the_model_and_the_dimension() -> None:
    base = RemoteConfig(
        base_url="https://api.openai.com/v1", model="text-embedding-3-small", dimensions=1536
    )
    same = replace(base, base_url="https://API.openai.com/v1/", api_key="sk-other")
    others = [
        replace(base, base_url="http://127.0.0.1:8400/v1"),
        replace(base, base_url="http://127.0.0.1:8401/v1"),
        replace(base, model="text-embedding-3-large"),
        replace(base, dimensions=512),
    ]
    name = remote_identity(base)
    assert name.startswith("text-embedding-3-small@") and len(name.split("@")[1]) == 12
    assert remote_identity(same) == name  # the key is no part of it
    assert len({name, *(remote_identity(o) for o in others)}) == 5
    assert model_identity("openai", base.model, base) == ("openai", name, 1536)
    names = {collection_name(*model_identity("openai", o.model, o)) for o in [base, *others]}
    assert len(names) == 5


def test_settings_for_openai(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("KBSTREAM_EMBEDDING_API_KEY", "OPENAI_API_KEY", "KBSTREAM_TOKENIZER"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings(home=tmp_path, embedding_provider="openai", embedding_model="m")
    with pytest.raises(PermanentError, match="KBSTREAM_EMBEDDING_DIMENSIONS"):
        Container(settings).model_identity  # noqa: B018
    monkeypatch.setenv("KBSTREAM_EMBEDDING_DIMENSIONS", "384")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    settings = Settings(home=tmp_path, embedding_provider="openai", embedding_model="m")
    assert remote_config(settings).api_key == "sk-fallback"
    assert "sk-fallback" not in repr(settings)
    monkeypatch.setenv("KBSTREAM_EMBEDDING_API_KEY", "sk-own")
    settings = Settings(home=tmp_path, embedding_provider="openai", embedding_model="m")
    assert remote_config(settings).api_key == "sk-own"
    assert "sk-own" not in repr(settings)
    container = Container(settings)
    provider, model, dim = container.model_identity
    assert (provider, dim) == ("openai", 384) and model.startswith("m@")
    assert isinstance(container.provider, OpenAICompatibleProvider)
    assert container.provider.model == model
    # no tokenizer given: the split stage estimates, with the remote model's limit
    assert isinstance(container.token_counter, ApproximateTokenCounter)
    assert container.token_counter.max_input_tokens == 8191


def test_a_tokenizer_for_the_split_stage(tmp_path: Path) -> None:
    folder = resolve_model(None)[1]
    exact = ModelTokenCounter(folder)
    settings = Settings(
        home=tmp_path,
        embedding_provider="openai",
        embedding_model="all-MiniLM-L6-v2",
        embedding_dimensions=384,
        tokenizer=str(folder),
    )
    counter = Container(settings).token_counter
    assert isinstance(counter, TokenizerFileCounter)
    assert counter.max_input_tokens == exact.max_input_tokens == 254  # the folder's limit
    text = (REPO / "examples/docs/streaming-indexing.md").read_text()
    assert counter.count_tokens(text) == exact.count_tokens(text)
    by_file = TokenizerFileCounter(folder / "tokenizer.json", 1000)
    assert by_file.max_input_tokens == 1000
    with pytest.raises(PermanentError, match=r"no tokenizer\.json"):
        TokenizerFileCounter(tmp_path, 1000)


def test_the_estimate_over_counts_real_text() -> None:
    """Against the bundled model's WordPiece (which itself counts more than BPE on
    English), paragraph by paragraph, in English and Chinese."""
    exact = ModelTokenCounter(resolve_model(None)[1])
    paragraphs = [
        p
        for f in [*(REPO / "examples/docs").iterdir(), REPO / "README.md"]
        for p in f.read_text().split("\n\n")
        if p.strip()
    ]
    assert len(paragraphs) > 50
    for p in paragraphs:
        assert estimate_tokens(p) >= exact.count_tokens(p), p
    assert estimate_tokens("") == 0
    assert estimate_tokens("结巴分词") == 9  # 4 CJK characters at 2, plus 10%
