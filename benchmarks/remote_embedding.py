"""Throughput of the openai provider (infra/remote_embedding.py) against the bare
speed of the server it talks to.

One command, from the repository root:

    .venv/bin/python benchmarks/remote_embedding.py [--texts N] [--repeat K] [--batch B]

tests/embedding_server.py runs as a child process on loopback, serving the bundled
all-MiniLM-L6-v2 through sentence-transformers. The texts are real chunks: README.md,
docs/*.md and examples/docs split with the automatic rule (up to 254 model tokens),
cycled with a numbered prefix until there are N distinct ones.

- **bare**: ``POST /bench``: the server process times its own direct model calls on
  the texts in batches of B (no HTTP, no JSON).
- **http**: ``OpenAICompatibleProvider.embed`` on the same texts in calls of 96 (what
  one embed poll takes at most), B texts a request, for each max concurrency given;
  rate limits off, so the figure is the client's and the protocol's overhead.

Each figure is the median of K runs after one warm-up; the variants take turns in
a rotating order, so a neighbour's load falls on all of them alike. It prints a table, then one
JSON line as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from domain.events import DocForm, ProcessRule  # noqa: E402
from domain.splitting import split_document  # noqa: E402
from domain.token_estimate import ApproximateTokenCounter  # noqa: E402
from infra.embedding import ModelTokenCounter, resolve_model  # noqa: E402
from infra.remote_embedding import OpenAICompatibleProvider, RemoteConfig  # noqa: E402

POLL = 96  # texts one embed poll hands the provider at most (KBSTREAM_EMBED_MAX_SEGMENTS)


def corpus(n: int) -> list[str]:
    counter = ModelTokenCounter(resolve_model(None)[1])
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "examples" / "docs").iterdir())
    chunks: list[str] = []
    for f in files:
        found = split_document(
            f.read_text(), DocForm.TEXT, ProcessRule(), counter, counter.max_input_tokens
        )
        chunks += [c.content for c in found if c.content.strip()]
    return [f"[{i}] {chunks[i % len(chunks)]}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "embedding_server.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the embedding server did not start within 120 s")


def timed_http(provider: OpenAICompatibleProvider, texts: list[str]) -> float:
    started = time.perf_counter()
    for k in range(0, len(texts), POLL):
        provider.embed(texts[k : k + POLL])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4", help="comma-separated")
    args = parser.parse_args()

    texts = corpus(args.texts)
    port = free_port()
    server = start_server(port)
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"texts": len(texts), "batch": args.batch, "repeat": args.repeat}
    try:
        bench = {"texts": texts, "batch_size": args.batch}
        providers = {}
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            config = RemoteConfig(
                base_url=f"{url}/v1",
                model="all-MiniLM-L6-v2",
                dimensions=384,
                batch_size=args.batch,
                max_concurrency=concurrency,
                requests_per_minute=0,
                tokens_per_minute=0,
            )
            providers[concurrency] = OpenAICompatibleProvider(config, ApproximateTokenCounter(254))
            providers[concurrency].embed(texts[:64])  # warm-up: connections, first JSON
        # interleaved, in a rotating order, so a neighbour's load falls on every
        # variant alike; /bench over one kept-alive connection, like the provider's,
        # so both run on a server thread that has run the model before
        bare: list[float] = []
        http: dict[int, list[float]] = {c: [] for c in providers}
        variants: list[int | None] = [None, *providers]
        with httpx.Client(timeout=600) as client:
            client.post(f"{url}/bench", json={**bench, "texts": texts[:64]})  # warm-up
            for k in range(args.repeat):
                for variant in variants[k % len(variants) :] + variants[: k % len(variants)]:
                    if variant is None:
                        bare.append(client.post(f"{url}/bench", json=bench).json()["seconds"])
                    else:
                        http[variant].append(timed_http(providers[variant], texts))
        result["bare_seconds"] = statistics.median(bare)
        result["bare_per_s"] = len(texts) / result["bare_seconds"]
        result["bare_runs"] = bare
        result["http"] = [
            {
                "concurrency": c,
                "seconds": statistics.median(runs),
                "per_s": len(texts) / statistics.median(runs),
                "ratio": result["bare_seconds"] / statistics.median(runs),
                "runs": runs,
            }
            for c, runs in http.items()
        ]
        for provider in providers.values():
            provider.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"{len(texts)} texts, {args.batch} a request, median of {args.repeat} runs")
    print(f"{'':<28}{'seconds':>9}{'texts/s':>10}{'÷ bare':>9}")
    print(
        f"{'bare model (in the server)':<28}{result['bare_seconds']:>9.2f}{result['bare_per_s']:>10.1f}"
    )
    for r in result["http"]:
        label = f"HTTP provider, {r['concurrency']} in flight"
        print(f"{label:<28}{r['seconds']:>9.2f}{r['per_s']:>10.1f}{r['ratio']:>9.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
