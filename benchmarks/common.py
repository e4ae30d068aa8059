"""What the benchmark scripts share (run.py, stages.py, processes.py): the corpus,
the model settings given on the command line, milvus-lite's release. Importing
it clears KBSTREAM_* from the environment: a benchmark must not inherit a
configured stack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The benchmark must not inherit a configured stack (KBSTREAM_BROKERS,
# KBSTREAM_DATABASE_URL, ...): Settings reads the environment, so clear it
# before anything builds one.
DROPPED_ENV = sorted(k for k in os.environ if k.upper().startswith("KBSTREAM_"))
for _k in DROPPED_ENV:
    del os.environ[_k]

DOC_ROOT = Path("/usr/share/doc/python3.11/html")
DOC_PACKAGE = "python3.11-doc"
DEFAULT_DOCS = 100
DATASET = "bench"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- corpus ------------------------------------------------------------------


def ensure_doc_package() -> Path:
    if (DOC_ROOT / "library").is_dir():
        return DOC_ROOT
    if shutil.which("apt-get") is None:
        raise SystemExit(f"{DOC_ROOT} is missing and apt-get is not available; use --corpus DIR")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", DOC_PACKAGE]
    say(f"corpus: {DOC_ROOT} missing; running: {' '.join(install)}")
    if subprocess.run(install, env=env).returncode != 0:
        say("corpus: install failed; running: apt-get update")
        subprocess.run(["apt-get", "update"], env=env, check=True)
        say(f"corpus: running again: {' '.join(install)}")
        subprocess.run(install, env=env, check=True)
    if not (DOC_ROOT / "library").is_dir():
        raise SystemExit(f"{DOC_PACKAGE} installed but {DOC_ROOT / 'library'} does not exist")
    return DOC_ROOT


def pick_corpus(corpus: Path | None, n: int, dest: Path) -> list[Path]:
    if corpus is None:
        source = ensure_doc_package() / "library"
        candidates = sorted(p for p in source.glob("*.html") if p.is_file())
    else:
        source = corpus.expanduser().resolve()
        if not source.is_dir():
            raise SystemExit(f"--corpus {source} is not a directory")
        lib = source / "library"
        if lib.is_dir():
            source = lib
        candidates = sorted(p for p in source.rglob("*.html") if p.is_file())
    chosen = candidates[:n]
    if not chosen:
        raise SystemExit(f"no HTML files under {source}")
    dest.mkdir(parents=True)
    out = []
    for p in chosen:
        target = dest / p.relative_to(source).as_posix().replace("/", "__")
        shutil.copyfile(p, target)
        out.append(target)
    return out


# -- settings and milvus-lite ---------------------------------------------------


# model settings from the command line (--device, --model, ...), shared with stages.py
MODEL_SETTINGS: dict[str, Any] = {}


def release_milvus_lite(path: str | None = None) -> None:
    """milvus-lite serves a local file from a gRPC server thread of this
    process that outlives MilvusClient.close() until interpreter exit (and then
    flushes into the folder). A `kbstream index` process exits after each run;
    do the same here so each phase starts as a fresh invocation would."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    if path is None:
        server_manager_instance.release_all()
    elif "://" not in path:
        server_manager_instance.release_server(path)


@contextmanager
def fresh_database(admin_url: str, prefix: str = "kbstream_bench") -> Iterator[str]:
    """A new PostgreSQL database for one run (its URL), dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
