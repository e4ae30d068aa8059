"""The documented workflow with real processes: `kbstream up --home H` in one
process, `kbstream index DIR --home H` in another, no operator setting (no
KBSTREAM_ALLOWED_ROOTS anywhere). Every document completes and is found;
versions stay small integers. Then a "second machine": a publisher with
another home and working directory that shares only the broker, the database
and Milvus with `up` gets its files indexed too: the bytes travel through
the database, never through a shared filesystem."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kbstream.processes import StackInfo
from tests.polling import poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
KBSTREAM = str(Path(sys.executable).with_name("kbstream"))


def scrubbed_env(**settings: str) -> dict[str, str]:
    """No KBSTREAM_* setting but ``settings``: in particular no allowed roots."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KBSTREAM_") and k not in ("COLUMNS", "LINES")
    }
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **settings)
    return env


@contextlib.contextmanager
def running_up(home: Path, *args: str) -> Iterator[StackInfo]:
    """`kbstream up --home HOME [ARGS]` with every stage, in a session of its own."""
    log = home.parent / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [KBSTREAM, "up", "--home", str(home), *args],
            cwd=REPO,
            env=scrubbed_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def live() -> StackInfo | None:
            info = StackInfo.read_live(home)
            return info if info is not None and info.pid == proc.pid else None

        assert poll(lambda: live() is not None or proc.poll() is not None, 180), log.read_text()
        info = live()
        assert info is not None, f"up did not come up:\n{log.read_text()}"
        yield info
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def kb(*args: str, cwd: Path, env: dict[str, str], rc: int = 0) -> Any:
    """Run a kbstream verb with --json; its parsed output."""
    proc = subprocess.run(
        [KBSTREAM, *args, "--json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == rc, f"kbstream {args} exited {proc.returncode}:\n{proc.stderr}"
    return json.loads(proc.stdout)


def write_docs(folder: Path, docs: dict[str, str]) -> None:
    folder.mkdir(parents=True)
    for name, text in docs.items():
        (folder / name).write_text(text)


DOCS = {
    "kafka.md": "# Kafka\n\nThe zorblax broker keeps partitions in order for every consumer.",
    "milvus.txt": "Milvus stores the quintaflor vectors beside their index node ids.",
    "jieba.md": "Keyword postings come from jieba; the glimmerwood tokens are weighted.",
}
REMOTE = {
    "far.md": "# Far away\n\nThe vandelquist report was written on another machine.",
    "near.txt": "Nothing on this disk is shared with the trellomax workers.",
}


def test_index_beside_up_and_from_a_second_machine(tmp_path: Path) -> None:
    home = tmp_path / "home"
    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    here = scrubbed_env()
    with running_up(home) as info:
        summary = kb(
            "index", str(docs), "--dataset", "notes", "--home", str(home), cwd=REPO, env=here
        )
        assert (summary["added"], summary["completed"], summary["failed"]) == (3, 3, 0), summary
        rows = kb("status", "--dataset", "notes", "--home", str(home), cwd=REPO, env=here)
        assert {(r["status"], r["version"], r["error"]) for r in rows} == {("completed", 1, None)}
        hits = kb(
            "search",
            "zorblax broker partitions",
            "--dataset",
            "notes",
            "--home",
            str(home),
            cwd=REPO,
            env=here,
        )
        assert hits and Path(hits[0]["document"]).name == "kafka.md", hits

        # a changed file is the document's next version, not a timestamp
        (docs / "milvus.txt").write_text("Milvus now keeps the quintaflor vectors compacted.")
        summary = kb(
            "index", str(docs), "--dataset", "notes", "--home", str(home), cwd=REPO, env=here
        )
        assert (summary["updated"], summary["skipped"], summary["completed"]) == (1, 2, 3)
        rows = kb("status", "--dataset", "notes", "--home", str(home), cwd=REPO, env=here)
        versions = {Path(r["document"]).name: r["version"] for r in rows}
        assert versions == {"kafka.md": 1, "milvus.txt": 2, "jieba.md": 1}

        # another machine: its own home and working directory, its own files;
        # only the broker, the database and Milvus are shared with `up`
        elsewhere = tmp_path / "machine2"
        remote = elsewhere / "docs"
        write_docs(remote, REMOTE)
        there = scrubbed_env(
            KBSTREAM_BROKERS=info.brokers,
            KBSTREAM_DATABASE_URL=f"sqlite:///{home / 'kbstream.db'}",
            KBSTREAM_MILVUS_URI=info.milvus_uri,
        )
        summary = kb(
            "index",
            "docs",
            "--dataset",
            "remote",
            "--home",
            str(elsewhere / "home"),
            cwd=elsewhere,
            env=there,
        )
        assert (summary["added"], summary["completed"], summary["failed"]) == (2, 2, 0), summary
        assert not (elsewhere / "home" / "stack.json").exists()  # it started no stack
        # the same files by reference cannot be read by `up`'s workers: no
        # allowed roots (and no shared disk on a real second machine)
        summary = kb(
            "index",
            "docs",
            "--dataset",
            "byref",
            "--home",
            str(elsewhere / "home"),
            "--by-reference",
            cwd=elsewhere,
            env=there,
            rc=1,
        )
        assert summary["failed"] == 2, summary
        assert all("no allowed roots are configured" in e["error"] for e in summary["errors"])
        for f in remote.iterdir():  # gone from that disk: the index holds the text
            f.unlink()
        hits = kb(
            "search",
            "vandelquist report",
            "--dataset",
            "remote",
            "--home",
            str(home),
            cwd=REPO,
            env=here,
        )
        assert hits and "vandelquist" in hits[0]["content"], hits


def test_up_with_the_faust_runtime_and_pods_of_one_stage(tmp_path: Path) -> None:
    """The same workflow under `--runtime faust`: stages as faust agents, two
    parse pods side by side as worker processes (they inherit the runtime)."""
    home = tmp_path / "home"
    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    here = scrubbed_env()
    with running_up(home, "--runtime", "faust", "--workers", "parse=2"):
        summary = kb(
            "index", str(docs), "--dataset", "notes", "--home", str(home), cwd=REPO, env=here
        )
        assert (summary["added"], summary["completed"], summary["failed"]) == (3, 3, 0), summary
        hits = kb(
            "search",
            "quintaflor vectors",
            "--dataset",
            "notes",
            "--home",
            str(home),
            cwd=REPO,
            env=here,
        )
        assert hits and Path(hits[0]["document"]).name == "milvus.txt", hits
    log = (home / "kbstream.log").read_text(errors="replace")
    assert "(faust)" in log and "Traceback" not in log
