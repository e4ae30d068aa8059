"""An OpenAI-compatible embedding service (``POST {base_url}/embeddings``) as an
EmbeddingProvider: OpenAI itself, Azure-style proxies, infinity-emb, vLLM, TEI.

One ``embed`` call is cut into requests of ``batch_size`` texts, at most
``max_concurrency`` in flight (a thread pool), each waiting for the shared rate
limiter (infra/rate_limit.py) before it is sent. A request that fails with 429, 408,
425, a 5xx or a connection error is retried alone with backoff and jitter (a 429's
Retry-After pauses every request of the process); the others' vectors are kept.
After ``max_attempts`` the call raises TransientError and the stage retries the
event later; the vectors the call did get are kept here and handed out again on that
retry, so no text reaches the service twice because another one failed. Any other
answer (400, 401, 404, a wrong count or dimension) is a PermanentError.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from domain.errors import PermanentError, TransientError
from domain.ports import ModelTokens
from domain.splitting import BatchTokenCounter
from domain.token_estimate import ApproximateTokenCounter
from infra.model_files import max_seq_length
from infra.rate_limit import RateLimiter, parse_retry_after

log = logging.getLogger(__name__)

PROVIDER = "openai"
RETRIED_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
_SALVAGE_LIMIT = 4096  # vectors kept from failed calls, for their retry


@dataclass(frozen=True)
class RemoteConfig:
    base_url: str
    model: str
    dimensions: int
    api_key: str | None = None
    batch_size: int = 32
    max_concurrency: int = 4
    requests_per_minute: int = 3000
    tokens_per_minute: int = 1_000_000
    timeout_seconds: float = 60.0
    send_dimensions: bool = False
    max_attempts: int = 8
    backoff_seconds: float = 0.5  # first backoff's scale; doubles up to max_backoff
    max_backoff_seconds: float = 20.0
    # a longer Retry-After fails the call at once (TransientError: the stage's retry
    # policy backs off); the shared pause it puts on every request is cut to this
    max_retry_after_seconds: float = 60.0

    @property
    def endpoint(self) -> str:
        return self.base_url.rstrip("/") + "/embeddings"


def remote_config(settings: Any) -> RemoteConfig:
    """The openai provider's configuration from Settings; refuses what cannot work."""
    s = settings
    if not s.embedding_model:
        raise PermanentError(
            "KBSTREAM_EMBEDDING_MODEL must name the remote model (e.g. text-embedding-3-small) "
            "when KBSTREAM_EMBEDDING_PROVIDER=openai"
        )
    if not s.embedding_dimensions:
        raise PermanentError(
            "KBSTREAM_EMBEDDING_DIMENSIONS must be set when KBSTREAM_EMBEDDING_PROVIDER=openai: "
            "it names the vector collection before the service is called"
        )
    if urlsplit(s.embedding_base_url).scheme not in ("http", "https"):
        raise PermanentError(
            f"KBSTREAM_EMBEDDING_BASE_URL {s.embedding_base_url!r} is not an http(s) URL"
        )
    key = s.embedding_api_key.get_secret_value() if s.embedding_api_key else None
    return RemoteConfig(
        base_url=s.embedding_base_url,
        model=s.embedding_model,
        dimensions=s.embedding_dimensions,
        api_key=key or os.environ.get("OPENAI_API_KEY") or None,
        batch_size=s.embedding_batch_size,
        max_concurrency=s.embedding_max_concurrency,
        requests_per_minute=s.embedding_rpm,
        tokens_per_minute=s.embedding_tpm,
        timeout_seconds=s.embedding_timeout_seconds,
        send_dimensions=s.embedding_send_dimensions,
        max_retry_after_seconds=s.embedding_max_retry_after_seconds,
    )


def remote_identity(config: RemoteConfig) -> str:
    """``<model>@<hash of host, model, dimensions>``: two services (or one model at two
    dimensions) never share embedding cache entries or a collection by accident."""
    parts = urlsplit(config.base_url)
    host = (parts.hostname or "").lower() + (f":{parts.port}" if parts.port else "")
    digest = hashlib.blake2b(
        f"{host}\x1f{config.model}\x1f{config.dimensions}".encode(), digest_size=16
    ).hexdigest()
    return f"{config.model[:200]}@{digest[:12]}"


# -- the split stage's token counter ------------------------------------------------------


class TokenizerFileCounter:
    """Counts with a local tokenizer.json (or a model folder holding one) that the
    user says matches the remote model."""

    def __init__(self, path: Path, max_input_tokens: int) -> None:
        from tokenizers import Tokenizer

        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise PermanentError(f"KBSTREAM_TOKENIZER: no tokenizer.json at {path}")
        self._tok = Tokenizer.from_file(str(file))
        self._tok.no_padding()
        self._tok.no_truncation()
        if path.is_dir() and (path / "sentence_bert_config.json").is_file():
            # the folder knows its model's input; special tokens take 2
            max_input_tokens = min(max_input_tokens, max_seq_length(path) - 2)
        self.max_input_tokens = max_input_tokens

    def count_tokens(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        encoded = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encoded]


def remote_token_counter(tokenizer: str | None, max_input_tokens: int) -> ModelTokens:
    """KBSTREAM_TOKENIZER if set, else the documented over-estimate."""
    if tokenizer:
        return TokenizerFileCounter(Path(tokenizer).expanduser(), max_input_tokens)
    return ApproximateTokenCounter(max_input_tokens)


# -- the provider ------------------------------------------------------------------------


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAICompatibleProvider:
    provider = PROVIDER

    def __init__(
        self,
        config: RemoteConfig,
        counter: ModelTokens,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        self.model = remote_identity(config)
        self.dim = config.dimensions
        self.max_input_tokens = counter.max_input_tokens
        self._counter = counter
        self.limiter = RateLimiter(
            config.requests_per_minute,
            config.tokens_per_minute,
            max_pause=config.max_retry_after_seconds,
        )
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        n = config.max_concurrency
        self._http = httpx.Client(
            headers=headers,
            timeout=config.timeout_seconds,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            transport=transport,
        )
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="embed-http")
        self._salvaged: OrderedDict[str, list[float]] = OrderedDict()
        self._salvage_lock = threading.Lock()
        self._backoff = wait_random_exponential(
            multiplier=config.backoff_seconds, max=config.max_backoff_seconds
        )

    def count_tokens(self, text: str) -> int:
        return self._counter.count_tokens(text)

    def warm_up(self) -> None:
        """One request: the service answers, and with vectors of the configured
        dimension (a mismatch is a PermanentError now, not at the first document)."""
        self.embed(["warm up"])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # -- embed ---------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out: list[list[float] | None] = [None] * len(texts)
        with self._salvage_lock:
            for i, text in enumerate(texts):
                out[i] = self._salvaged.pop(text, None)
        todo = [i for i, v in enumerate(out) if v is None]
        size = self.config.batch_size
        batches = [todo[k : k + size] for k in range(0, len(todo), size)]
        futures: dict[Future[list[list[float]]], list[int]] = {
            self._pool.submit(self._embed_batch, [texts[i] for i in b]): b for b in batches
        }
        wait(futures)
        failure: BaseException | None = None
        for future, indices in futures.items():
            error = future.exception()
            if error is not None:
                # a permanent failure outranks a transient one: retrying cannot help
                if failure is None or isinstance(error, PermanentError):
                    failure = error
                continue
            for i, vector in zip(indices, future.result(), strict=True):
                out[i] = vector
        if failure is not None:
            self._salvage(texts, out)
            raise failure
        return out  # type: ignore[return-value]  # every slot is filled

    def _salvage(self, texts: Sequence[str], out: Sequence[list[float] | None]) -> None:
        with self._salvage_lock:
            for text, vector in zip(texts, out, strict=True):
                if vector is not None:
                    self._salvaged[text] = vector
            while len(self._salvaged) > _SALVAGE_LIMIT:
                self._salvaged.popitem(last=False)

    def _tokens(self, texts: list[str]) -> int:
        """What the request costs the tokens-per-minute budget; nothing to count
        without one (the split stage counted these texts already)."""
        if self.limiter.tokens is None:
            return 0
        if isinstance(self._counter, BatchTokenCounter):
            return sum(self._counter.count_tokens_batch(texts))
        return sum(self._counter.count_tokens(t) for t in texts)

    def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        tokens = self._tokens(texts)
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(self.config.max_attempts),
                wait=self._wait,
                retry=retry_if_exception_type(_Retryable),
                reraise=True,
            ):
                with attempt:
                    self.limiter.acquire(tokens)
                    return self._post(texts)
        except _Retryable as exc:
            raise TransientError(
                f"embedding service {self.config.endpoint} failed {self.config.max_attempts} "
                f"times in a row: {exc}"
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, state: Any) -> float:
        error = state.outcome.exception() if state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            # the limiter holds every request until then; the jitter spreads the
            # retries of this batch and its neighbours once the pause ends
            return float(retry_after) + random.uniform(0, 0.1 * retry_after + 0.05)
        return float(self._backoff(state))

    def _post(self, texts: list[str]) -> list[list[float]]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "input": texts,
            "encoding_format": "float",
        }
        if self.config.send_dimensions:
            body["dimensions"] = self.config.dimensions
        try:
            response = self._http.post(self.config.endpoint, json=body)
        except httpx.TransportError as exc:  # connection refused or reset, timeouts
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status == 200:
            return self._vectors(response, len(texts))
        excerpt = response.text[:300].replace("\n", " ")
        if status in RETRIED_STATUSES:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status == 429:
                if retry_after is None:
                    # no hint: everyone backs off a little (jittered), not just this batch
                    retry_after = min(self.config.max_backoff_seconds, 1.0 + random.random())
                # capped: an hour-long (or infinite) Retry-After must not hold every
                # later call of the process that long
                self.limiter.pause_for(retry_after)
            if retry_after is not None and retry_after > self.config.max_retry_after_seconds:
                raise TransientError(
                    f"embedding service asks to wait {retry_after:.0f} s (HTTP {status} "
                    f"Retry-After), above the {self.config.max_retry_after_seconds:g} s cap "
                    "(KBSTREAM_EMBEDDING_MAX_RETRY_AFTER_SECONDS); the stage retries the "
                    "event later"
                )
            raise _Retryable(f"HTTP {status}: {excerpt}", retry_after)
        raise PermanentError(
            f"embedding service {self.config.endpoint} refused the request (HTTP {status}): "
            f"{excerpt}"
        )

    def _vectors(self, response: httpx.Response, expected: int) -> list[list[float]]:
        try:
            data = response.json()["data"]
            rows = {int(item["index"]): item["embedding"] for item in data}
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(
                f"embedding service answered 200 without OpenAI-style data: {exc}"
            ) from exc
        if len(data) != expected or sorted(rows) != list(range(expected)):
            raise PermanentError(
                f"embedding service returned {len(data)} vectors with indexes "
                f"{sorted(rows)[:10]}... for {expected} inputs"
            )
        try:
            matrix = np.asarray([rows[i] for i in range(expected)], dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise PermanentError(f"embedding service returned malformed vectors: {exc}") from exc
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise PermanentError(
                f"embedding service returned vectors of shape {matrix.shape}, not "
                f"{self.dim}-dimensional ones; set KBSTREAM_EMBEDDING_DIMENSIONS to the model's "
                "dimension (or KBSTREAM_EMBEDDING_SEND_DIMENSIONS=true for a model that can "
                "shorten its vectors)"
            )
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix = matrix / np.where(norms > 0, norms, 1.0)  # cosine, as the local provider
        return matrix.tolist()  # type: ignore[no-any-return]
