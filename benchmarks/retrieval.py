"""Retrieval quality and HTTP latency: recall@5 and MRR of vector, keyword and
hybrid search side by side on an English and a Chinese query set, and query
latency p50/p95 through `kbstream serve` (warm). From the repository root:

    .venv/bin/python benchmarks/retrieval.py [--home DIR] [--repeat N] [--out FILE]
        [--fusion rrf|score] [--vector-weight W] [--keyword-weight W] [--no-evidence]

1. corpora  English: 40 pages of Debian's python3.11-doc (library/*.html);
            Chinese: 30 man pages of Debian's manpages-zh, rendered to text
            with groff (what `man -l` runs). Missing packages are fetched with `apt-get download`
            and unpacked with `dpkg-deb -x` into ~/.cache/kbstream-bench.
2. index    `kbstream index` into a fresh home (datasets `en` and `zh`);
            with --home DIR an already indexed home is reused.
3. serve    `kbstream serve` on a free loopback port, bearer token set.
4. quality  every query of benchmarks/queries/{en,zh}.jsonl in every mode over
            HTTP (POST /v1/datasets/{dataset}/search, top_k 10): recall@5 = the
            right page among the first 5 hits, MRR = mean of 1 / rank of its
            first hit (0 beyond 10). Also per half of each file: the fusion
            default was chosen on the first English half only (en1).
5. latency  the English queries --repeat times per mode, after one warm-up
            query: p50 and p95 of the client-side round trip.
6. scores   at score threshold 0.5 (THRESHOLD): recall@5 of the on-topic
            questions with the hits under it left out, and the share of
            off-topic questions (benchmarks/queries/{en,zh}_off.jsonl: cooking,
            travel, sports, ... against the same datasets) that get no hit at
            all; per mode over /v1/datasets/{dataset}/search, and through Dify's
            endpoint POST /retrieval with score_threshold 0.5.

Exits 1 if hybrid is worse than the better of vector and keyword (recall@5 or
MRR) on either set, or if through /retrieval at 0.5 fewer than 90% of the
off-topic questions get nothing or recall@5 drops by more than 5 points. The
last stdout line is the result as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
QUERIES = REPO / "benchmarks" / "queries"
CACHE = Path.home() / ".cache" / "kbstream-bench"
MODES = ("vector", "keyword", "hybrid")
API_KEY = "retrieval-benchmark"
THRESHOLD = 0.5  # what the README tells a Dify user to set

EN_PAGES = [
    "argparse",
    "json",
    "csv",
    "datetime",
    "re",
    "pathlib",
    "shutil",
    "subprocess",
    "threading",
    "asyncio-task",
    "logging",
    "sqlite3",
    "collections",
    "itertools",
    "functools",
    "random",
    "math",
    "statistics",
    "hashlib",
    "zipfile",
    "tarfile",
    "tempfile",
    "glob",
    "time",
    "uuid",
    "urllib.request",
    "http.server",
    "socket",
    "unittest",
    "pickle",
    "copy",
    "heapq",
    "bisect",
    "base64",
    "textwrap",
    "gzip",
    "secrets",
    "fnmatch",
    "getpass",
    "shlex",
]
ZH_PAGES = [
    "grep",
    "chmod",
    "df",
    "du",
    "kill",
    "scp",
    "sort",
    "tail",
    "wc",
    "ln",
    "diff",
    "tar",
    "uniq",
    "chown",
    "sleep",
    "touch",
    "cut",
    "mkdir",
    "find",
    "sed",
    "gzip",
    "date",
    "xargs",
    "rm",
    "ls",
    "ssh",
    "tee",
    "head",
    "mv",
    "cp",
]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without a configured stack (KBSTREAM_*), offline."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KBSTREAM_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


# -- corpora -------------------------------------------------------------------


def unpacked(package: str, inside: str, system: Path) -> Path:
    """``system`` if the package is installed there, else unpacked in CACHE
    (a bare zh_CN/man1 folder exists without manpages-zh)."""
    if system.is_dir() and (any(system.glob("grep.1*")) or (system / "json.html").is_file()):
        return system
    root = CACHE / package
    target = root / inside
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        say(f"corpus: apt-get download {package}")
        subprocess.run(["apt-get", "download", package], cwd=CACHE, check=True)
        deb = sorted(CACHE.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return target


def english_corpus(dest: Path) -> Path:
    lib = unpacked(
        "python3.11-doc",
        "usr/share/doc/python3.11/html/library",
        Path("/usr/share/doc/python3.11/html/library"),
    )
    dest.mkdir(parents=True)
    for page in EN_PAGES:
        shutil.copyfile(lib / f"{page}.html", dest / f"{page}.html")
    return dest


def chinese_corpus(dest: Path) -> Path:
    man1 = unpacked("manpages-zh", "usr/share/man/zh_CN/man1", Path("/usr/share/man/zh_CN/man1"))
    dest.mkdir(parents=True)
    for page in ZH_PAGES:
        source = gzip.decompress((man1 / f"{page}.1.gz").read_bytes())
        # what `man -l` runs, without the pager: groff's man macros to UTF-8 text
        rendered = subprocess.run(
            ["groff", "-Kutf-8", "-Tutf8", "-mandoc", "-P-cbou", "-rLL=80n", "-W", "all"],
            input=source,
            capture_output=True,
            check=True,
        ).stdout.decode("utf-8", "replace")
        if not rendered.strip():
            raise SystemExit(f"groff rendered {page}.1.gz empty")
        (dest / f"{page}.txt").write_text(rendered, encoding="utf-8")
    return dest


def index(home: Path, folder: Path, dataset: str) -> dict[str, Any]:
    say(f"index: {folder} -> dataset {dataset}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kbstream.cli",
            "index",
            str(folder),
            "--dataset",
            dataset,
            "--home",
            str(home),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise SystemExit(f"kbstream index failed:\n{proc.stdout}\n{proc.stderr}")
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary


# -- the server -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve(home: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kbstream.cli", "serve", "--home", str(home), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kbstream serve exited; see {home / 'serve.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("kbstream serve did not come up in 180 s")


# -- measuring ------------------------------------------------------------------


def load_queries(name: str) -> list[dict[str, str]]:
    lines = (QUERIES / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def ask(
    client: httpx.Client, dataset: str, query: str, mode: str, k: int, threshold: float = 0.0
) -> list[str]:
    return [t for t, s in ask_scored(client, dataset, query, mode, k) if s >= threshold]


def ask_scored(
    client: httpx.Client, dataset: str, query: str, mode: str, k: int
) -> list[tuple[str, float]]:
    r = client.post(
        f"/v1/datasets/{dataset}/search", json={"query": query, "mode": mode, "top_k": k}
    )
    r.raise_for_status()
    return [(h["title"], h["score"]) for h in r.json()["hits"]]


def retrieval(
    client: httpx.Client, dataset: str, query: str, k: int, threshold: float
) -> list[str]:
    """Dify's endpoint, as Dify asks it."""
    body = {
        "knowledge_id": dataset,
        "query": query,
        "retrieval_setting": {"top_k": k, "score_threshold": threshold},
    }
    r = client.post("/retrieval", json=body)
    r.raise_for_status()
    return [rec["title"] for rec in r.json()["records"]]


def thresholded(
    client: httpx.Client,
    dataset: str,
    on_topic: list[dict[str, str]],
    off_topic: list[dict[str, str]],
) -> dict[str, Any]:
    """recall@5 at THRESHOLD (and without) and the share of off-topic questions
    with no hit at THRESHOLD, per mode and through /retrieval."""
    out: dict[str, Any] = {}
    for mode in (*MODES, "retrieval"):
        found = found_at = empty = 0
        for q in on_topic:
            if mode == "retrieval":
                every = retrieval(client, dataset, q["query"], 10, 0.0)
                kept = retrieval(client, dataset, q["query"], 10, THRESHOLD)
            else:
                scored = ask_scored(client, dataset, q["query"], mode, 10)
                every = [t for t, _ in scored]
                kept = [t for t, s in scored if s >= THRESHOLD]
            found += q["page"] in every[:5]
            found_at += q["page"] in kept[:5]
        tops = []
        for q in off_topic:
            if mode == "retrieval":
                kept = retrieval(client, dataset, q["query"], 10, THRESHOLD)
            else:
                scored = ask_scored(client, dataset, q["query"], mode, 10)
                tops.append(scored[0][1] if scored else 0.0)
                kept = [t for t, s in scored if s >= THRESHOLD]
            empty += not kept
        out[mode] = {
            "recall@5": round(found / len(on_topic), 3),
            f"recall@5_at_{THRESHOLD}": round(found_at / len(on_topic), 3),
            f"off_topic_empty_at_{THRESHOLD}": round(empty / len(off_topic), 3),
        }
        if tops:
            out[mode]["off_topic_best_score_max"] = round(max(tops), 3)
    return out


def score(ranks: list[int | None], pages: list[str]) -> dict[str, Any]:
    """recall@5 and MRR (over the first 10 hits) of the right pages' ranks."""
    n = len(ranks)
    found = sum(1 for r in ranks if r is not None and r <= 5)
    return {
        "recall@5": round(found / n, 3),
        "mrr": round(sum(1.0 / r for r in ranks if r) / n, 3),
        "hits": found,
        "queries": n,
        "misses": [p for r, p in zip(ranks, pages, strict=True) if r is None or r > 5],
    }


def quality(
    client: httpx.Client, dataset: str, queries: list[dict[str, str]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every mode on the whole set, and on its two halves (first and second
    half of the file): the fusion default was chosen on the first half only."""
    out: dict[str, Any] = {}
    halves: dict[str, Any] = {"1": {}, "2": {}}
    half = len(queries) // 2
    pages = [q["page"] for q in queries]
    for mode in MODES:
        ranks: list[int | None] = []
        for q in queries:
            titles = ask(client, dataset, q["query"], mode, 10)
            ranks.append(titles.index(q["page"]) + 1 if q["page"] in titles else None)
        out[mode] = score(ranks, pages)
        halves["1"][mode] = score(ranks[:half], pages[:half])
        halves["2"][mode] = score(ranks[half:], pages[half:])
    return out, halves


def latency(
    client: httpx.Client, dataset: str, queries: list[dict[str, str]], repeat: int
) -> dict[str, Any]:
    ask(client, dataset, "warm up", "hybrid", 5)
    out: dict[str, Any] = {}
    for mode in MODES:
        times = []
        for _ in range(repeat):
            for q in queries:
                t = time.perf_counter()
                ask(client, dataset, q["query"], mode, 5)
                times.append((time.perf_counter() - t) * 1000)
        times.sort()
        out[mode] = {
            "p50_ms": round(statistics.median(times), 1),
            "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1),
            "n": len(times),
        }
    return out


def not_worse(q: dict[str, Any]) -> list[str]:
    bad = []
    for metric in ("recall@5", "mrr"):
        better = max(q["vector"][metric], q["keyword"][metric])
        if q["hybrid"][metric] < better:
            bad.append(f"hybrid {metric} {q['hybrid'][metric]} < {better}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, help="reuse (or create) this home instead of a temp one")
    ap.add_argument("--repeat", type=int, default=3, help="latency passes over the English set")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/retrieval.json")
    ap.add_argument("--fusion", choices=("rrf", "score"), help="KBSTREAM_HYBRID_FUSION for serve")
    ap.add_argument("--vector-weight", help="KBSTREAM_HYBRID_VECTOR_WEIGHT for serve")
    ap.add_argument("--keyword-weight", help="KBSTREAM_HYBRID_KEYWORD_WEIGHT for serve")
    ap.add_argument(
        "--no-evidence", action="store_true", help="KBSTREAM_HYBRID_KEYWORD_EVIDENCE=false"
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kbstream-retrieval-"))
    home = (args.home or tmp / "home").absolute()
    result: dict[str, Any] = {"home": str(home)}
    try:
        if not (home / "kbstream.db").exists():
            result["index"] = {
                "en": index(home, english_corpus(tmp / "en"), "en"),
                "zh": index(home, chinese_corpus(tmp / "zh"), "zh"),
            }
        extra = {"KBSTREAM_API_KEY": API_KEY}
        if args.fusion:
            extra["KBSTREAM_HYBRID_FUSION"] = args.fusion
        if args.vector_weight:
            extra["KBSTREAM_HYBRID_VECTOR_WEIGHT"] = args.vector_weight
        if args.keyword_weight:
            extra["KBSTREAM_HYBRID_KEYWORD_WEIGHT"] = args.keyword_weight
        if args.no_evidence:
            extra["KBSTREAM_HYBRID_KEYWORD_EVIDENCE"] = "false"
        port = free_port()
        started = time.perf_counter()
        server = serve(home, port, clean_env(**extra))
        result["serve_start_s"] = round(time.perf_counter() - started, 1)
        try:
            headers = {"Authorization": f"Bearer {API_KEY}"}
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60
            ) as client:
                sets = {"en": load_queries("en"), "zh": load_queries("zh")}
                result["quality"], result["halves"] = {}, {}
                for name, qs in sets.items():
                    whole, halves = quality(client, name, qs)
                    result["quality"][name] = whole
                    for h, q in halves.items():
                        result["halves"][f"{name}{h}"] = q
                result["thresholded"] = {
                    name: thresholded(client, name, sets[name], load_queries(f"{name}_off"))
                    for name in sets
                }
                result["latency_en"] = latency(client, "en", sets["en"], args.repeat)
        finally:
            server.terminate()
            server.wait(30)
    finally:
        if args.home is None:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'set':4} {'mode':8} {'recall@5':>9} {'MRR':>6}   {'p50 ms':>7} {'p95 ms':>7}")
    for name, q in result["quality"].items():
        for mode in MODES:
            lat = result["latency_en"][mode] if name == "en" else {}
            print(
                f"{name:4} {mode:8} {q[mode]['recall@5']:>9.3f} {q[mode]['mrr']:>6.3f}   "
                f"{lat.get('p50_ms', ''):>7} {lat.get('p95_ms', ''):>7}"
            )
    print("halves (the fusion default was chosen on en1 only):")
    for name, q in result["halves"].items():
        for mode in MODES:
            print(f"{name:4} {mode:8} {q[mode]['recall@5']:>9.3f} {q[mode]['mrr']:>6.3f}")
    print(f"at score threshold {THRESHOLD}:")
    print(f"{'set':4} {'mode':9} {'recall@5':>9} {'at 0.5':>7} {'off-topic empty':>16}")
    for name, t in result["thresholded"].items():
        for mode, m in t.items():
            print(
                f"{name:4} {mode:9} {m['recall@5']:>9.3f} {m[f'recall@5_at_{THRESHOLD}']:>7.3f} "
                f"{m[f'off_topic_empty_at_{THRESHOLD}']:>16.3f}"
            )
    problems = [f"{n}: {p}" for n, q in result["quality"].items() for p in not_worse(q)]
    for name, t in result["thresholded"].items():
        m = t["retrieval"]
        if m[f"off_topic_empty_at_{THRESHOLD}"] < 0.9:
            problems.append(f"{name}: /retrieval at {THRESHOLD} answers off-topic questions")
        if m["recall@5"] - m[f"recall@5_at_{THRESHOLD}"] > 0.05 + 1e-9:
            problems.append(f"{name}: /retrieval at {THRESHOLD} loses on-topic answers")
    result["problems"] = problems
    for p in problems:
        print(f"FAIL {p}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result, ensure_ascii=False))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
