"""`kbstream up --workers`: stages as supervised worker processes on the
embedded stack (SQLite written by several processes at once). A worker that
is SIGKILLed is restarted and the restart is one line; SIGTERM to `up` stops
every worker gracefully; SQLite writers wait for each other instead of
failing with "database is locked"."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import children
from tests.polling import poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
WORKERS = {"parse": 1, "split": 2, "embed": 1, "index_keywords": 2}


def env() -> dict[str, str]:
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KBSTREAM_") and k not in ("COLUMNS", "LINES")
    }
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return e


def kbstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "kbstream.cli", *args]


def worker_pids(up: int) -> dict[str, list[int]]:
    """`kbstream worker STAGE` children of ``up``, per stage."""
    out: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) != up:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"worker" in argv and children.running(int(entry.name)):
                stage = argv[argv.index(b"worker") + 1].decode()
                out.setdefault(stage, []).append(int(entry.name))
    return out


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    home = tmp_path / "home"
    log = tmp_path / "up.log"
    spec = ",".join(f"{s}={n}" for s, n in WORKERS.items())
    with log.open("wb") as out:
        proc = subprocess.Popen(
            kbstream("up", "--home", str(home), "--workers", spec),
            cwd=REPO,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, home, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def joined(log: Path) -> dict[str, int]:
    text = log.read_text(errors="replace")
    return {s: len(re.findall(rf"stage {s} assigned \[\(", text)) for s in WORKERS}


def index(home: Path, corpus: Path, dataset: str) -> dict[str, object]:
    done = subprocess.run(
        kbstream("index", str(corpus), "--dataset", dataset, "--home", str(home), "--json"),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_up_runs_stages_as_supervised_processes(
    tmp_path: Path, up: tuple[subprocess.Popen[bytes], Path, Path]
) -> None:
    proc, home, log = up
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(16):
        (corpus / f"d{i}.txt").write_text(
            " ".join(f"Worker note {i}.{k} on the harbour and its lighthouse." for k in range(30))
        )
    assert poll(lambda: all(n >= WORKERS[s] for s, n in joined(log).items()), 120, 0.5), (
        log.read_text()
    )
    assert {s: len(p) for s, p in worker_pids(proc.pid).items()} == WORKERS
    first = index(home, corpus, "a")
    assert first["completed"] == first["documents"] == 16, first

    victim = worker_pids(proc.pid)["split"][0]
    os.kill(victim, signal.SIGKILL)
    restarted = re.compile(
        rf"worker split#\d \(pid {victim}\) was killed by SIGKILL after \d+s; "
        r"restarting in 1s \(restart 1\)"
    )
    assert poll(lambda: restarted.search(log.read_text()) is not None, 30), log.read_text()
    assert poll(lambda: len(worker_pids(proc.pid).get("split", [])) == 2, 30)
    assert victim not in worker_pids(proc.pid)["split"]
    second = index(home, corpus, "b")  # every text is a cache hit; still every stage runs
    assert second["completed"] == 16, second

    pids = [p for ps in worker_pids(proc.pid).values() for p in ps]
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(90) == 0, log.read_text()[-3000:]
    assert not any(children.running(p) for p in pids)
    text = log.read_text(errors="replace") + (home / "kbstream.log").read_text(errors="replace")
    assert "database is locked" not in text
    # every worker process left its group on SIGTERM
    left = {s: len(re.findall(rf"stage {s} stopped", log.read_text())) for s in WORKERS}
    assert left == WORKERS, left
    assert "Traceback" not in text


def test_a_bad_workers_flag_fails_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        kbstream("up", "--home", str(tmp_path / "h"), "--workers", "bogus=2"),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a running stage" in lines[0], done.stderr
    assert not (tmp_path / "h" / "stack.json").exists()
