"""A small OpenAI-compatible embedding server (``POST /v1/embeddings``) for tests and
the remote-embedding benchmark, serving the REAL bundled all-MiniLM-L6-v2 through
sentence-transformers (or, for fast unit tests, the named HashingEmbeddingDouble).

It can be told to misbehave (``set_faults`` in process, ``POST /control`` over HTTP):
answer a fraction of requests, or the next N, with 429 (and a Retry-After) or any
other status; answer slowly; shuffle the order of ``data``; or return one vector too
few or too short. ``GET /stats`` tells what it did; ``POST /bench`` times direct model
calls inside the server process (the benchmark's bare speed).

infinity-emb was the first choice: it does not install beside torch==2.13.0 (see
README "Remote embedding services"), so this stands in for it.

    .venv/bin/python tests/embedding_server.py --port 8400 [--double]
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

Backend = Callable[[list[str]], np.ndarray]


def real_model_backend(batch_size: int = 32) -> tuple[Backend, int]:
    """The bundled model, loaded the way a serving stack would: sentence-transformers
    on the folder, vectors as the model outputs them."""
    from sentence_transformers import SentenceTransformer

    from infra.embedding import bundled_model_dir

    model = SentenceTransformer(str(bundled_model_dir()), device="cpu", local_files_only=True)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, convert_to_numpy=True)

    return encode, int(model.get_embedding_dimension() or 0)


def free_backend(dim: int = 384) -> tuple[Backend, int]:
    """A model that costs (almost) nothing, for benchmarks of the indexer's own
    cost (benchmarks/free.py): a deterministic ``dim``-d vector from a hash of
    each text. Values are multiples of 1/64 so the JSON stays short and cheap to
    write. Not a production provider."""
    import hashlib

    def encode(texts: list[str]) -> np.ndarray:
        raw = b"".join(hashlib.shake_128(t.encode()).digest(dim) for t in texts)
        ints = np.frombuffer(raw, dtype=np.int8).reshape(len(texts), dim)
        return (ints >> 1).astype(np.float32) / 64.0

    return encode, dim


def double_backend() -> tuple[Backend, int]:
    from tests.fakes import HashingEmbeddingDouble

    double = HashingEmbeddingDouble()
    return (lambda texts: np.asarray(double.embed(texts), dtype=np.float32)), double.dim


@dataclass
class Faults:
    status: int = 429
    fraction: float = 0.0  # of requests answered with ``status``
    count: int | None = None  # at most this many such answers (None: no limit)
    retry_after: str | None = "0.2"  # the Retry-After header of those answers
    delay: float = 0.0  # seconds before every answer
    shuffle: bool = False  # answer ``data`` out of order (clients must use ``index``)
    mangle: str | None = None  # "count": one vector too few; "dimension": vectors too short


@dataclass
class Stats:
    requests: int = 0
    injected: Counter[int] = field(default_factory=Counter)  # status -> answers
    ok_requests: int = 0
    texts: Counter[str] = field(default_factory=Counter)  # successfully embedded texts
    batch_sizes: list[int] = field(default_factory=list)
    authorization: str | None = None  # of the last request

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "injected": {str(k): v for k, v in self.injected.items()},
            "ok_requests": self.ok_requests,
            "texts_embedded": sum(self.texts.values()),
            "distinct_texts": len(self.texts),
            "batch_sizes": self.batch_sizes,
        }


class EmbeddingServer:
    def __init__(
        self, backend: tuple[Backend, int], host: str = "127.0.0.1", port: int = 0, seed: int = 7
    ) -> None:
        self.encode, self.dim = backend
        self.faults = Faults()
        self.stats = Stats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()  # one forward pass at a time, as a GPU worker
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> EmbeddingServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="embedding-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> EmbeddingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- knobs ---------------------------------------------------------------------

    def set_faults(self, **knobs: Any) -> None:
        """Replace every knob (unnamed ones back to their defaults)."""
        with self._lock:
            self.faults = Faults(**knobs)

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = Stats()

    def _injected_status(self) -> int | None:
        with self._lock:
            self.stats.requests += 1
            f = self.faults
            if f.fraction <= 0 or f.count == 0 or self._rng.random() >= f.fraction:
                return None
            if f.count is not None:
                f.count -= 1
            self.stats.injected[f.status] += 1
            return f.status

    # -- the model -----------------------------------------------------------------

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._model_lock:
            return self.encode(texts)

    def bench(self, texts: Sequence[str], batch_size: int) -> float:
        """Seconds the model takes for ``texts`` in batches of ``batch_size``."""
        started = time.perf_counter()
        for k in range(0, len(texts), batch_size):
            self.embed(list(texts[k : k + batch_size]))
        return time.perf_counter() - started

    def answer(
        self, body: dict[str, Any], authorization: str | None = None
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        """(status, headers, JSON) for one /v1/embeddings request."""
        self.stats.authorization = authorization
        f = self.faults
        if f.delay:
            time.sleep(f.delay)
        status = self._injected_status()
        if status is not None:
            headers = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
            return status, headers, _error(f"injected {status}", "rate_limit_exceeded")
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if (
            not isinstance(texts, list)
            or not texts
            or not all(isinstance(t, str) and t for t in texts)
            or not isinstance(body.get("model"), str)
        ):
            return 400, {}, _error("input must be a non-empty string or list of them, with model")
        if body.get("dimensions") not in (None, self.dim):
            return 400, {}, _error(f"this model only produces {self.dim} dimensions")
        vectors = self.embed(texts)
        order = list(range(len(texts)))
        if f.shuffle:
            random.Random(len(texts)).shuffle(order)
        if f.mangle == "count":
            order = order[:-1]
        width = self.dim // 2 if f.mangle == "dimension" else self.dim
        data = [
            {"object": "embedding", "index": i, "embedding": vectors[i][:width].tolist()}
            for i in order
        ]
        with self._lock:
            self.stats.ok_requests += 1
            self.stats.texts.update(texts)
            self.stats.batch_sizes.append(len(texts))
        words = sum(len(t.split()) for t in texts)
        usage = {"prompt_tokens": words, "total_tokens": words}
        return 200, {}, {"object": "list", "data": data, "model": body["model"], "usage": usage}


def _error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}}


def _handler(server: EmbeddingServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers
        # headers and body go out in two writes: with Nagle's algorithm the body
        # waits for the client's delayed ACK (40 ms a request on Linux)
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                return json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                return None

        def do_GET(self) -> None:
            if self.path == "/stats":
                self._send(200, server.stats.to_json())
            elif self.path in ("/health", "/v1/models"):
                self._send(200, {"object": "list", "data": [{"id": "all-MiniLM-L6-v2"}]})
            else:
                self._send(404, _error("not found"))

        def do_POST(self) -> None:
            body = self._body()
            if not isinstance(body, dict):
                self._send(400, _error("body is not a JSON object"))
            elif self.path == "/v1/embeddings":
                status, headers, payload = server.answer(body, self.headers.get("Authorization"))
                self._send(status, payload, headers)
            elif self.path == "/control":
                server.set_faults(**body)
                self._send(200, {"ok": True})
            elif self.path == "/reset":
                server.reset_stats()
                self._send(200, {"ok": True})
            elif self.path == "/bench":
                seconds = server.bench(body["texts"], int(body.get("batch_size", 32)))
                self._send(200, {"seconds": seconds})
            else:
                self._send(404, _error("not found"))

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--double", action="store_true", help="the hashing double, not the model")
    parser.add_argument(
        "--free", action="store_true", help="384-d hash vectors at near-zero cost (benchmarks)"
    )
    args = parser.parse_args()
    if args.free:
        backend = free_backend()
    else:
        backend = double_backend() if args.double else real_model_backend()
    server = EmbeddingServer(backend, args.host, args.port)
    print(f"serving {server.base_url}/embeddings", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
