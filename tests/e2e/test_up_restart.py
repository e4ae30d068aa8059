"""`kbstream up` with real processes: SIGKILLed, it takes its milvus-lite
server and tansu broker with it and a restart comes up cleanly; a second
`up` for the same home, or a foreign holder of the Milvus data dir, fails at
once in one line; a killed child stops `up` with a one-line reason; the
orphans a dead `up` recorded are cleaned up on the next start; and the
events its broker acknowledged come back from the broker journal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import children
from kbstream.processes import StackError, StackInfo, apply_running_stack
from kbstream.settings import Settings
from tests.polling import poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]

# one light stage: the tests are about up's processes, not the pipeline
UP_STAGES = "track_status"
PIPELINE_STAGES = ("parse", "split", "embed", "load_vectors", "index_keywords", "track_status")


KBSTREAM = str(Path(sys.executable).with_name("kbstream"))


def up_command(home: Path, stages: str = UP_STAGES) -> list[str]:
    return [KBSTREAM, "up", "--home", str(home), "--stages", stages]


def _env() -> dict[str, str]:
    # no COLUMNS: a one-line message must stay one line at the default width
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KBSTREAM_") and k not in ("COLUMNS", "LINES")
    }
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A kbstream process in a session of its own (so a test can kill its
    whole group), its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class Up:
    """One `kbstream up` process in a session of its own."""

    def __init__(self, home: Path, n: int, stages: str = UP_STAGES) -> None:
        self.home = home
        self.log = home.parent / f"up-{n}.log"
        self.proc = _spawn(up_command(home, stages), self.log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def last_line(self) -> str:
        lines = self.output().strip().splitlines()
        return lines[-1] if lines else ""

    def info(self) -> StackInfo | None:
        info = StackInfo.read_live(self.home)
        return info if info is not None and info.pid == self.proc.pid else None

    def wait_ready(self, timeout: float = 90.0) -> StackInfo:
        ok = poll(lambda: self.info() is not None or self.proc.poll() is not None, timeout)
        info = self.info()
        assert ok and info is not None, (
            f"up did not come up (rc={self.proc.poll()}):\n{self.output()}"
        )
        return info

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"up still runs after {timeout}s:\n{self.output()}") from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    h = tmp_path / "home"
    yield h
    left = leftovers(h)
    for pid in left:  # never leave a server behind for the next test
        children.kill(pid, None)
    assert not left, f"left running: {[children.describe(p) for p in left]}"


@pytest.fixture
def ups(home: Path) -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for u in started:
        if u.proc.poll() is None:
            u.kill()


def start(ups: list[Up], home: Path, stages: str = UP_STAGES) -> Up:
    u = Up(home, len(ups), stages)
    ups.append(u)
    return u


def leftovers(home: Path) -> list[int]:
    """Running processes whose command line names this home, or a broker port it used."""
    needles = [str(home).encode()]
    with contextlib.suppress(FileNotFoundError):
        for line in (home / "broker.log").read_bytes().splitlines():
            if b"127.0.0.1:" in line:
                needles.append(line.split(b"127.0.0.1:")[1].split()[0].strip(b'",'))
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        pid = int(p)
        if pid == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if any(n in cmd for n in needles) and children.running(pid):
            out.append(pid)
    return out


def recorded(info: StackInfo) -> dict[str, tuple[int, int | None]]:
    return {c.name: (c.pid, c.started) for c in info.children}


def assert_serving(info: StackInfo) -> None:
    from confluent_kafka.admin import AdminClient
    from pymilvus import MilvusClient

    client = MilvusClient(uri=info.milvus_uri, timeout=10)
    try:
        assert isinstance(client.list_collections(), list)
    finally:
        client.close()
    AdminClient({"bootstrap.servers": info.brokers}).list_topics(timeout=10)


def stats(home: Path, dataset: str = "x") -> dict[str, object]:
    proc = subprocess.run(
        [KBSTREAM, "stats", "--dataset", dataset, "--json", "--home", str(home)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"kbstream stats failed:\n{proc.stdout}\n{proc.stderr}"
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def test_sigkilled_up_takes_its_children_and_restarts_cleanly(home: Path, ups: list[Up]) -> None:
    first = start(ups, home)
    info = first.wait_ready()
    kids = recorded(info)
    assert set(kids) == {"milvus-lite server", "tansu broker"}
    assert all(children.running(pid, started) for pid, started in kids.values())
    assert_serving(info)

    first.proc.send_signal(signal.SIGKILL)  # the up process only, not its group
    first.proc.wait(10)
    for name, (pid, started) in kids.items():
        assert children.wait_gone(pid, started, 5), f"{name} outlived the killed up"
    assert StackInfo.path(home).exists()  # nobody removed it: it is stale now

    # a verb now cleans up and runs on the embedded file: nothing holds it
    stats(home)
    assert not StackInfo.path(home).exists()
    s = apply_running_stack(Settings(home=home))
    assert (s.brokers, s.milvus_uri) == (None, None)

    second = start(ups, home)
    again = second.wait_ready()
    assert again.pid != info.pid
    assert_serving(again)
    s = apply_running_stack(Settings(home=home))
    assert (s.brokers, s.milvus_uri) == (again.brokers, again.milvus_uri)
    stats(home)  # a verb beside the new `up` reaches its servers

    second.proc.send_signal(signal.SIGTERM)
    assert second.wait_exit(30) == 0, second.output()
    assert not StackInfo.path(home).exists()
    assert poll(lambda: not leftovers(home), 5), leftovers(home)


def test_a_second_up_for_the_same_home_fails_fast(home: Path, ups: list[Up]) -> None:
    first = start(ups, home)
    info = first.wait_ready()
    t0 = time.monotonic()
    second = start(ups, home)
    assert second.wait_exit(20) == 2
    assert time.monotonic() - t0 < 20
    line = second.last_line()
    assert line.startswith(f"error: a kbstream up is already running for {home} (pid {info.pid}")
    assert "Traceback" not in second.output()
    # the first one is untouched
    assert first.info() is not None and all(
        children.running(pid, started) for pid, started in recorded(info).values()
    )
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait_exit(30) == 0


@pytest.mark.parametrize("victim", ["milvus-lite server", "tansu broker"])
def test_up_stops_in_one_line_when_a_child_is_killed(
    victim: str, home: Path, ups: list[Up]
) -> None:
    u = start(ups, home)
    kids = recorded(u.wait_ready())
    pid, _ = kids.pop(victim)
    os.kill(pid, signal.SIGKILL)
    assert u.wait_exit(30) == 1
    assert u.last_line() == (
        f"error: the {victim} (pid {pid}) was killed by SIGKILL; kbstream up stops, start it again"
    )
    ((other, (other_pid, other_started)),) = kids.items()
    assert children.wait_gone(other_pid, other_started, 5), f"{other} outlived up"
    assert not StackInfo.path(home).exists()


def test_up_names_a_foreign_holder_of_the_milvus_dir_and_leaves_it_alone(
    home: Path, ups: list[Up]
) -> None:
    data_dir = home / "milvus.db"
    data_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(300)\n",
            str(data_dir / "LOCK"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        u = start(ups, home)
        assert u.wait_exit(20) == 2
        assert u.last_line().startswith(
            f"error: milvus data dir {data_dir} is locked by pid {holder.pid} ({Path(sys.executable).name} -c import fcntl"
        ), u.output()
        assert u.last_line().endswith("point KBSTREAM_MILVUS_URI at a running Milvus")
        assert holder.poll() is None, "up killed a process that is not its own"
        # a verb says the same instead of retrying "Milvus unavailable" forever
        with pytest.raises(StackError, match=f"is locked by pid {holder.pid}"):
            apply_running_stack(Settings(home=home))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]


def test_up_cleans_up_the_recorded_orphans_of_a_dead_up(home: Path, ups: list[Up]) -> None:
    """What a `kbstream up` from before die-with-parent left behind: a
    milvus-lite server holding the data dir, and a stack.json naming it."""
    from kbstream.processes import ChildRecord, MilvusLiteServer

    home.mkdir(parents=True)
    port = MilvusLiteServer(home / "milvus.db").port
    orphan = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("milvus-lite")),
            "server",
            "--data-dir",
            str(home / "milvus.db"),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert poll(lambda: children.is_locked(home / "milvus.db" / "LOCK"), 60)
        dead = subprocess.Popen(["true"])
        dead_started = children.start_time(dead.pid)
        dead.wait()
        StackInfo(
            dead.pid,
            "127.0.0.1:1",
            f"http://127.0.0.1:{port}",
            dead_started,
            [ChildRecord("milvus-lite server", orphan.pid, children.start_time(orphan.pid))],
        ).write(home)
        u = start(ups, home)
        info = u.wait_ready()
        assert orphan.wait(10) == -signal.SIGKILL
        assert_serving(info)
        u.proc.send_signal(signal.SIGTERM)
        assert u.wait_exit(30) == 0, u.output()
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


# -- the broker journal: a SIGKILLed `up` loses no acknowledged event ------------------

JOURNAL_DATASET = "journal"
JOURNAL_TOPICS = ("lifecycle", "parsed", "segments", "embedded", "progress")
# every stage, in the order the test stops them: each cohort of documents is
# published with the stages from its hold-up on stopped, so it waits there
HOLD_UPS = {
    "A": ("track_status",),  # its progress events wait
    "B": ("load_vectors",),  # embedded
    "C": ("embed", "index_keywords"),  # segments
    "D": ("split",),  # parsed
    "E": ("parse",),  # lifecycle
}


class StageWorker:
    """`kbstream worker STAGE` beside a running `up` (it finds it through stack.json)."""

    def __init__(self, home: Path, stage: str) -> None:
        self.stage = stage
        self.log = home.parent / f"worker-{stage}.log"
        self.proc = _spawn([KBSTREAM, "worker", stage, "--home", str(home)], self.log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def assigned(self) -> bool:
        assert self.proc.poll() is None, f"worker {self.stage} exited:\n{self.output()}"
        return f"stage {self.stage} assigned [(" in self.output()

    def stop(self) -> None:
        """SIGTERM: it finishes its batch, publishes, commits and leaves."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"worker {self.stage} did not stop:\n{self.output()}") from None
        assert rc == 0, f"worker {self.stage} exited {rc}:\n{self.output()}"


def _cohort_docs(cohort: str) -> list[dict[str, object]]:
    return [
        {
            "type": "document.created",
            "dataset_id": JOURNAL_DATASET,
            "document_id": f"{cohort}{i}",
            "source": f"{cohort}{i}.txt",
            "version": 1,
            "content": f"Cohort {cohort} note {i}: the ferry to island {cohort}{i} leaves "
            f"at {i + 6} o'clock.\n\nBring {i + 2} tickets and a lantern for the {cohort} pier.",
        }
        for i in range(2)
    ]


def _publish(home: Path, events: list[dict[str, object]]) -> None:
    proc = subprocess.run(
        [KBSTREAM, "publish", "--home", str(home)],
        input=json.dumps(events),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"kbstream publish failed:\n{proc.stdout}\n{proc.stderr}"


def _db(home: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    import sqlite3

    conn = sqlite3.connect(f"file:{home / 'kbstream.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _segments(home: Path, cohort: str) -> tuple[int, int, int, int]:
    """(segments, vector-indexed, keyword-indexed, embedded) of a cohort."""
    (row,) = _db(
        home,
        "SELECT count(*), coalesce(sum(vector_indexed), 0), coalesce(sum(keywords_indexed), 0), "
        "(SELECT count(*) FROM segments s2 JOIN embeddings e ON e.doc_hash = s2.doc_hash "
        " WHERE s2.document_id LIKE ?) FROM segments WHERE document_id LIKE ?",
        f"{cohort}_",
        f"{cohort}_",
    )
    return tuple(int(str(v)) for v in row)  # type: ignore[return-value]


def _statuses(home: Path, cohort: str) -> list[str]:
    return [
        str(s)
        for (s,) in _db(
            home, "SELECT status FROM documents WHERE document_id LIKE ? ORDER BY 1", f"{cohort}_"
        )
    ]


def _held_up(home: Path, cohort: str) -> bool:
    """The cohort went as far as the running stages take it."""
    if cohort == "E":
        return True  # published: its lifecycle events wait for parse
    if cohort == "D":
        return _statuses(home, "D") == ["splitting", "splitting"]
    n, vectors, keywords, embedded = _segments(home, cohort)
    if cohort == "C":
        return n > 0 and _statuses(home, "C") == ["indexing", "indexing"]
    if cohort == "B":
        return n > 0 and embedded == n and keywords == n
    return n > 0 and vectors == n and keywords == n  # A


@pytest.mark.timeout(900)  # six worker processes and two `up`s on a loaded 2-core machine
def test_sigkilled_up_loses_no_acknowledged_event(home: Path, ups: list[Up]) -> None:
    """Events in flight on every topic when `up` is SIGKILLed (with its broker,
    which keeps topics in memory): the next `up` replays them from the
    broker journal, and every document completes exactly."""
    from infra.kafka.journal import BrokerJournal
    from kbstream.journal import journal_path

    first = start(ups, home, stages="")  # the broker; the stages run as workers
    first.wait_ready()
    workers = {s: StageWorker(home, s) for s in PIPELINE_STAGES}
    try:
        assert poll(lambda: all(w.assigned() for w in workers.values()), 180)
        for cohort, stopped in HOLD_UPS.items():
            for stage in stopped:
                workers.pop(stage).stop()
            _publish(home, _cohort_docs(cohort))
            assert poll(lambda c=cohort: _held_up(home, c), 180), (cohort, _statuses(home, cohort))
        assert not workers
    finally:
        for w in workers.values():
            os.killpg(w.proc.pid, signal.SIGKILL)
    with BrokerJournal(journal_path(home)) as journal:
        held = journal.counts()
    assert {t.removeprefix("kbstream.") for t in held} >= set(JOURNAL_TOPICS), held
    assert [s for c in HOLD_UPS for s in _statuses(home, c) if s == "completed"] == []

    first.kill()  # the whole process group, as a crash would: broker and topics gone
    second = start(ups, home, stages=",".join(PIPELINE_STAGES))
    second.wait_ready()
    every = [f"{c}{i}" for c in HOLD_UPS for i in range(2)]

    def done() -> bool:
        rows = _db(home, "SELECT status FROM documents WHERE dataset_id = ?", JOURNAL_DATASET)
        return len(rows) == len(every) and all(s == "completed" for (s,) in rows)

    assert poll(done, 300, 1.0), _db(home, "SELECT document_id, status FROM documents")
    for cohort in HOLD_UPS:
        n, vectors, keywords, _ = _segments(home, cohort)
        assert n > 0 and vectors == keywords == n, (cohort, n, vectors, keywords)
    counts = stats(home, JOURNAL_DATASET)
    assert counts["segments"] == counts["vectors"] == counts["keyword_entities"], counts
    proc = subprocess.run(
        [KBSTREAM, "verify", "--dataset", JOURNAL_DATASET, "--home", str(home)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "no drift" in proc.stdout, proc.stdout + proc.stderr
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait_exit(60) == 0, second.output()
