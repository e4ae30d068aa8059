"""The indexer's own cost, with a model that costs nothing (issue 17).

One command, from the repository root:

    .venv/bin/python benchmarks/free.py [--corpora pages,small] [--dbs sqlite,postgresql]
        [--modes baseline,oneshot,warm] [--docs 100] [--small 1000] [--repeat 1] [--pg URL]

``--embedder free`` (the only one): tests/embedding_server.py --free runs beside the
benchmark as an OpenAI-compatible server answering deterministic 384-d vectors from a
hash of each text at near-zero cost, so what is left is kbstream's own work. kbstream
uses it as a remote model: KBSTREAM_EMBEDDING_PROVIDER=openai, batch 256, no rate
limits, KBSTREAM_TOKENIZER = the bundled model's folder (the same chunks as the local
model).

Corpora: ``pages``, the first N python3.11-doc library pages (as benchmarks/run.py);
``small``, M documents of about 800 characters cut at paragraph ends from the text of
the same pages (.txt files).

For each corpus and database (SQLite in the home; PostgreSQL: a fresh database on
``--pg``, dropped afterwards), on a fresh home each:

- **baseline**: one process calls the same code in a plain loop, batches of 32
  documents: extract (infra.extract.extract_text), split (domain.splitting) and
  build segments, embed through the same openai provider, then store: embedding
  cache, Milvus vectors, the BM25 keyword index, documents and segment rows. No
  broker, no events, no status. Timed after a warm-up (migrations, milvus-lite,
  jieba, tokenizer).
- **oneshot**: `kbstream index CORPUS` on the fresh home (starts the embedded
  stack for the command, stops it after).
- **warm**: `kbstream up` started and joined, a warm-up document indexed, then
  `kbstream index CORPUS` timed.

Wall seconds are the `kbstream index` command's (process start to exit; ``index_s``
is the time inside it, from planning to the summary). CPU is every kbstream process's
(the index command and what it started, and in warm mode `up` and its children over
the same interval, from /proc), never the embedding server's (reported apart).
Prints a table with the ratios side by side; the last line is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402  (clears KBSTREAM_*)
    DATASET,
    fresh_database,
    pick_corpus,
    say,
)

PG_URL = os.environ.get(
    "KBSTREAM_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
SMALL_CHARS = 800
BASELINE_BATCH = 32
WARM_UP = "Warm-up page. The harbour master keeps a ledger of every ship in port.\n"
FREE_MODEL = "free-hash-384"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- corpora -------------------------------------------------------------------


def small_documents(pages: Sequence[Path], n: int, dest: Path) -> list[Path]:
    """``n`` documents of about SMALL_CHARS characters, cut at paragraph ends
    from the pages' text, in page order (the pages are cycled if they run out)."""
    from infra.extract import extract_text

    texts = [extract_text(p.read_bytes(), p.name).text for p in pages]
    pieces: list[str] = []
    for text in texts:
        current = ""
        for para in (q.strip() for q in re.split(r"\n\s*\n", text)):
            if not para:
                continue
            current = f"{current}\n\n{para}" if current else para
            if len(current) >= SMALL_CHARS:
                pieces.append(current[: 2 * SMALL_CHARS])
                current = ""
    if not pieces:
        raise SystemExit("the pages gave no text")
    dest.mkdir(parents=True)
    out = []
    for i in range(n):
        # cycled pieces get a number, so every document (and its doc_hash) differs
        body = pieces[i % len(pieces)]
        if i >= len(pieces):
            body = f"[{i // len(pieces)}] {body}"
        path = dest / f"doc-{i:05d}.txt"
        path.write_text(body + "\n")
        out.append(path)
    return out


# -- the free embedding server -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def free_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "embedding_server.py"),
            "--free",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("the free embedding server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        proc.terminate()
        proc.wait(10)


def model_env(base_url: str) -> dict[str, str]:
    from infra.embedding import bundled_model_dir

    return {
        "KBSTREAM_EMBEDDING_PROVIDER": "openai",
        "KBSTREAM_EMBEDDING_BASE_URL": base_url,
        "KBSTREAM_EMBEDDING_MODEL": FREE_MODEL,
        "KBSTREAM_EMBEDDING_DIMENSIONS": "384",
        "KBSTREAM_EMBEDDING_API_KEY": "free",
        "KBSTREAM_EMBEDDING_BATCH_SIZE": "256",
        "KBSTREAM_EMBEDDING_RPM": "0",
        "KBSTREAM_EMBEDDING_TPM": "0",
        "KBSTREAM_TOKENIZER": str(bundled_model_dir()),
    }


# -- CPU accounting ------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and its reaped children)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the name: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and every live descendant (reaped ones are in
    their parents' cutime/cstime)."""
    procs: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and (st := _stat(int(d))) is not None:
            procs[int(d)] = st
    tree, total, grew = {root}, 0.0, True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    for pid in tree:
        if pid in procs:
            total += procs[pid][1]
    return total


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- PostgreSQL ----------------------------------------------------------------------


@contextmanager
def database(kind: str, pg: str) -> Iterator[str | None]:
    if kind == "sqlite":
        yield None
        return
    with fresh_database(pg, "kbstream_free") as url:
        yield url


# -- the runs --------------------------------------------------------------------------


def kbstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "kbstream.cli", *args]


def run_env(base_url: str, home: Path, db_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBSTREAM_")}
    env.update(model_env(base_url), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["KBSTREAM_HOME"] = str(home)
    if db_url:
        env["KBSTREAM_DATABASE_URL"] = db_url
    return env


def timed_index(corpus: Path, env: dict[str, str], also: int | None = None) -> dict[str, Any]:
    """`kbstream index CORPUS`: wall, and CPU of it (reaped children included)
    and of the tree under ``also`` (a running `up`) over the same interval."""
    argv = kbstream("index", str(corpus), "--dataset", DATASET, "--json")
    up_before = tree_cpu(also) if also else 0.0
    before = children_cpu()
    t = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    cpu = children_cpu() - before
    up_cpu = (tree_cpu(also) - up_before) if also else 0.0
    if done.returncode != 0:
        raise SystemExit(f"kbstream index failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    return {
        "wall_s": wall,
        "index_s": summary["seconds"],
        "cpu_s": cpu + up_cpu,
        "cli_cpu_s": cpu,
        "documents": summary["documents"],
        "completed": summary["completed"],
        "segments": summary["segments"],
        "embedded": summary["embedded"],
    }


def run_oneshot(corpus: Path, base_url: str, home: Path, db_url: str | None) -> dict[str, Any]:
    return timed_index(corpus, run_env(base_url, home, db_url))


def wait_joined(log: Path, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    from consumers.pipeline import STAGES

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kbstream up exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        text = log.read_text(errors="replace")
        if all(re.search(rf"stage {s} assigned \[\(", text) for s in STAGES):
            return
        time.sleep(0.3)
    raise SystemExit(f"consumers did not join within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def run_warm(
    corpus: Path, base_url: str, home: Path, db_url: str | None, up_args: Sequence[str] = ()
) -> dict[str, Any]:
    env = run_env(base_url, home, db_url)
    home.mkdir(parents=True, exist_ok=True)
    log = home.parent / f"{home.name}-up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            kbstream("up", *up_args),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_joined(log, up)
        warm = home.parent / f"{home.name}-warm"
        warm.mkdir()
        (warm / "warm-up.txt").write_text(WARM_UP)
        subprocess.run(
            kbstream("index", str(warm), "--dataset", "warmup", "--json"),
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        time.sleep(1.0)  # let the warm-up's last commits settle before the clock
        return timed_index(corpus, env, also=up.pid)
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)


def run_baseline(corpus: Path, base_url: str, home: Path, db_url: str | None) -> dict[str, Any]:
    """The loop runs in a child process of its own (a clean environment, its
    milvus-lite in its tree); it prints its figures as JSON."""
    env = run_env(base_url, home, db_url)
    # benchmarks.common clears KBSTREAM_* on import: hand the settings over apart
    env["FREE_BENCH_SETTINGS"] = json.dumps(
        {k: v for k, v in env.items() if k.startswith("KBSTREAM_")}
    )
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "_baseline", str(corpus)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"baseline failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def baseline_loop(corpus: Path) -> dict[str, Any]:
    """Extract, split, embed and store every file of ``corpus`` in a plain
    loop with kbstream's own code; this process's environment configures it."""
    from domain.documents import DocKey, Document
    from domain.events import DocForm, ProcessRule
    from domain.ports import KeywordRow, VectorRow
    from domain.segments import build_segments, diff_segments
    from domain.splitting import split_document
    from infra.extract import extract_text
    from kbstream.bootstrap import Container
    from kbstream.settings import Settings

    os.environ.update(json.loads(os.environ["FREE_BENCH_SETTINGS"]))
    container = Container(Settings())
    tenant = container.settings.tenant
    files = sorted(p for p in corpus.iterdir() if p.is_file())
    tokens = container.tokens
    provider = container.provider
    # one-off costs first: migrations, milvus-lite and both collections, jieba, tokenizer
    with container.uow(readonly=True) as uow:
        uow.documents.list(tenant, DATASET)
    warm_key = DocKey(tenant, DATASET, "warm-up")
    container.vectors.ids_for_document(warm_key)
    container.keyword_index.count(tenant, DATASET)
    container.keyword_index.upsert([KeywordRow("warm-up", warm_key, "warm up the dictionary")])
    container.keyword_index.delete(["warm-up"])
    tokens.count_tokens("warm up")
    provider.embed(["warm up"])
    rule = ProcessRule()
    segments_total = 0
    cpu0, t0 = tree_cpu(os.getpid()), time.perf_counter()
    for k in range(0, len(files), BASELINE_BATCH):
        batch = files[k : k + BASELINE_BATCH]
        docs = []
        for path in batch:
            text = extract_text(path.read_bytes(), path.name).text
            chunks = split_document(text, DocForm.TEXT, rule, tokens, tokens.max_input_tokens)
            key = DocKey(tenant, DATASET, path.name)
            docs.append((key, build_segments(DATASET, path.name, chunks, tenant_id=tenant)))
        texts = {s.doc_hash: s.content for _, segs in docs for s in segs}
        vectors = dict(zip(texts, provider.embed(list(texts.values())), strict=True))
        container.vectors.upsert(
            [
                VectorRow(s.index_node_id, vectors[s.doc_hash], key)
                for key, segs in docs
                for s in segs
            ]
        )
        container.keyword_index.upsert(
            [KeywordRow(s.index_node_id, key, s.content) for key, segs in docs for s in segs]
        )
        with container.uow() as uow:
            uow.embeddings.put_many(tenant, provider.provider, provider.model, vectors)
            for key, segs in docs:
                doc = Document.new(key, version=1, source=key.document_id)
                uow.documents.add(doc)
                uow.segments.replace_split(doc, segs, diff_segments([], segs), keep_removed=False)
            uow.commit()
        segments_total += sum(len(segs) for _, segs in docs)
    wall = time.perf_counter() - t0
    cpu = tree_cpu(os.getpid()) - cpu0
    container.close()
    return {
        "wall_s": wall,
        "index_s": wall,
        "cpu_s": cpu,
        "documents": len(files),
        "completed": len(files),
        "segments": segments_total,
        "embedded": segments_total,
    }


# -- report --------------------------------------------------------------------------


def figures(r: dict[str, Any]) -> dict[str, Any]:
    segs, docs = max(r["segments"], 1), max(r["documents"], 1)
    return {
        **r,
        "segments_per_s": segs / r["wall_s"],
        "documents_per_s": docs / r["wall_s"],
        "cpu_ms_per_segment": 1000 * r["cpu_s"] / segs,
        "cpu_ms_per_document": 1000 * r["cpu_s"] / docs,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (its own CPU figures with it)."""
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


def render(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'corpus':<7}{'db':<11}{'mode':<9}{'docs':>6}{'segs':>6}{'wall s':>8}{'docs/s':>8}"
        f"{'segs/s':>8}{'CPU ms/seg':>11}{'CPU ms/doc':>11}{'÷ base':>8}{'CPU ÷ base':>11}"
    )
    lines = [head]
    base = {(r["corpus"], r["db"]): r for r in results if r["mode"] == "baseline"}
    for r in results:
        b = base.get((r["corpus"], r["db"]))
        speed = f"{r['segments_per_s'] / b['segments_per_s']:.2f}" if b else ""
        cpu = f"{r['cpu_ms_per_segment'] / b['cpu_ms_per_segment']:.2f}" if b else ""
        lines.append(
            f"{r['corpus']:<7}{r['db']:<11}{r['mode']:<9}{r['documents']:>6}{r['segments']:>6}"
            f"{r['wall_s']:>8.2f}{r['documents_per_s']:>8.1f}{r['segments_per_s']:>8.1f}"
            f"{r['cpu_ms_per_segment']:>11.2f}{r['cpu_ms_per_document']:>11.2f}"
            f"{speed:>8}{cpu:>11}"
        )
    sqlite = {(r["corpus"], r["mode"]): r for r in results if r["db"] == "sqlite"}
    for r in results:
        s = sqlite.get((r["corpus"], r["mode"]))
        if r["db"] == "postgresql" and s:
            lines.append(
                f"PostgreSQL ÷ SQLite wall, {r['corpus']} {r['mode']}: "
                f"{r['wall_s'] / s['wall_s']:.2f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_baseline"]:
        print(json.dumps(baseline_loop(Path(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embedder", choices=["free"], default="free")
    ap.add_argument("--corpora", default="pages,small")
    ap.add_argument("--dbs", default="sqlite,postgresql")
    ap.add_argument("--modes", default="baseline,oneshot,warm")
    ap.add_argument("--docs", type=int, default=100, help="python3.11-doc pages")
    ap.add_argument("--small", type=int, default=1000, help="small documents")
    ap.add_argument("--corpus", type=Path, help="HTML folder instead of python3.11-doc")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the median is shown")
    ap.add_argument("--pg", default=PG_URL, help="PostgreSQL admin URL (databases are created)")
    ap.add_argument("--up-args", default="", help="extra `kbstream up` arguments (warm)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="kbstream-free-"))
    results: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    try:
        pages = pick_corpus(args.corpus, args.docs, root / "pages")
        corpora = {"pages": root / "pages"}
        if "small" in args.corpora:
            small_documents(pages, args.small, root / "small")
            corpora["small"] = root / "small"
        with free_server() as (base_url, server):
            server_cpu0 = tree_cpu(server.pid)
            n = 0
            for corpus in args.corpora.split(","):
                for db in args.dbs.split(","):
                    for mode in args.modes.split(","):
                        runs = []
                        for _ in range(args.repeat):
                            n += 1
                            home = root / f"run-{n}-{corpus}-{db}-{mode}" / "home"
                            say(f"free: {corpus} {db} {mode} ...")
                            with database(db, args.pg) as url:
                                if mode == "baseline":
                                    r = run_baseline(corpora[corpus], base_url, home, url)
                                elif mode == "oneshot":
                                    r = run_oneshot(corpora[corpus], base_url, home, url)
                                else:
                                    r = run_warm(
                                        corpora[corpus], base_url, home, url, args.up_args.split()
                                    )
                            r = figures({"corpus": corpus, "db": db, "mode": mode, **r})
                            say(
                                f"free: {corpus} {db} {mode}: {r['wall_s']:.2f} s, "
                                f"{r['cpu_ms_per_segment']:.2f} ms CPU/segment"
                            )
                            runs.append(r)
                        med = median_run(runs)
                        med["walls"] = [round(r["wall_s"], 2) for r in runs]
                        results.append(med)
            server_cpu = tree_cpu(server.pid) - server_cpu0
        load.append(os.getloadavg()[0])
    finally:
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"free embedder; {os.cpu_count()} cores; load average {load[0]:.2f} -> {load[-1]:.2f}; "
        f"embedding server CPU {server_cpu:.1f} s over all runs (not in the figures)"
    )
    print(render(results))
    out = {
        "benchmark": "free",
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "loadavg": load,
        "server_cpu_s": server_cpu,
        "results": results,
    }
    print(json.dumps(out))
    ok = all(r["completed"] == r["documents"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
