"""stack.json: telling a running `kbstream up` from a dead one (pid gone, or
pid reused by another program), and cleaning up what a dead one left. The
"processes" here are real `sleep`s, so pids and start times are real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infra import children
from kbstream.processes import ChildRecord, StackError, StackInfo, apply_running_stack, reap_stale
from kbstream.settings import Settings

Sleeper = Callable[[], "subprocess.Popen[bytes]"]


@pytest.fixture
def sleeper() -> Iterator[Sleeper]:
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["sleep", "60"])
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _dead_pid() -> tuple[int, int | None]:
    p = subprocess.Popen(["true"])
    started = children.start_time(p.pid)
    p.wait()
    return p.pid, started


def _me() -> tuple[int, int | None]:
    return os.getpid(), children.start_time(os.getpid())


def _record(p: subprocess.Popen[bytes], started: int | None = None) -> ChildRecord:
    return ChildRecord(
        "sleep", p.pid, started if started is not None else children.start_time(p.pid)
    )


def test_a_live_up_is_found(tmp_path: Path) -> None:
    pid, started = _me()
    StackInfo(pid, "127.0.0.1:1", "http://127.0.0.1:2", started).write(tmp_path)
    info = StackInfo.read_live(tmp_path)
    assert info is not None and info.brokers == "127.0.0.1:1" and info.started == started


def test_a_dead_pid_is_stale(tmp_path: Path) -> None:
    pid, started = _dead_pid()
    StackInfo(pid, "127.0.0.1:1", "http://127.0.0.1:2", started).write(tmp_path)
    assert StackInfo.read(tmp_path) is not None
    assert StackInfo.read_live(tmp_path) is None


def test_a_reused_pid_is_stale(tmp_path: Path) -> None:
    # our pid is alive, but the recorded start time says it was another process
    pid, started = _me()
    assert started is not None, "needs /proc"
    StackInfo(pid, "127.0.0.1:1", "http://127.0.0.1:2", started - 1).write(tmp_path)
    assert StackInfo.read_live(tmp_path) is None


def test_a_zombie_is_not_running(sleeper: Sleeper) -> None:
    p = sleeper()
    started = children.start_time(p.pid)
    assert children.running(p.pid, started)
    os.kill(p.pid, signal.SIGKILL)
    assert children.wait_gone(p.pid, started, 5), "a killed, unreaped child still counts as running"
    assert p.poll() is not None  # it was a zombie until now


def test_an_old_stack_json_without_start_times_still_works(tmp_path: Path) -> None:
    StackInfo.path(tmp_path).write_text(
        json.dumps({"pid": os.getpid(), "brokers": "b:1", "milvus_uri": "http://m:2"})
    )
    assert StackInfo.read_live(tmp_path) is not None
    pid, _ = _dead_pid()
    StackInfo.path(tmp_path).write_text(
        json.dumps({"pid": pid, "brokers": "b:1", "milvus_uri": "http://m:2"})
    )
    assert StackInfo.read_live(tmp_path) is None


def test_reaping_kills_recorded_orphans_and_spares_reused_pids(
    tmp_path: Path, sleeper: Sleeper
) -> None:
    orphan, innocent = sleeper(), sleeper()
    innocent_started = children.start_time(innocent.pid)
    assert innocent_started is not None
    pid, started = _dead_pid()
    StackInfo(
        pid,
        "127.0.0.1:1",
        "http://127.0.0.1:2",
        started,
        # the innocent's pid with another start time: a process that reused a recorded pid
        [_record(orphan), _record(innocent, innocent_started - 1)],
    ).write(tmp_path)
    killed = reap_stale(tmp_path)
    assert killed == [f"pid {orphan.pid} (sleep 60)"]
    assert orphan.wait(5) == -signal.SIGKILL
    assert innocent.poll() is None, "a process that merely reused a recorded pid was killed"
    assert not StackInfo.path(tmp_path).exists()


def test_reaping_leaves_a_live_stack_alone(tmp_path: Path, sleeper: Sleeper) -> None:
    child = sleeper()
    pid, started = _me()
    StackInfo(pid, "127.0.0.1:1", "http://127.0.0.1:2", started, [_record(child)]).write(tmp_path)
    assert reap_stale(tmp_path) == []
    assert child.poll() is None
    assert StackInfo.read_live(tmp_path) is not None


def test_an_unreadable_stack_json_is_removed(tmp_path: Path) -> None:
    StackInfo.path(tmp_path).write_text("{not json")
    assert StackInfo.read(tmp_path) is None
    assert reap_stale(tmp_path) == []
    assert not StackInfo.path(tmp_path).exists()


def test_a_verb_beside_a_live_up_uses_its_servers(tmp_path: Path) -> None:
    pid, started = _me()
    StackInfo(pid, "127.0.0.1:1", "http://127.0.0.1:2", started).write(tmp_path)
    s = apply_running_stack(Settings(home=tmp_path))
    assert (s.brokers, s.milvus_uri) == ("127.0.0.1:1", "http://127.0.0.1:2")


def test_a_verb_beside_a_live_up_journals_to_its_broker_journal(tmp_path: Path) -> None:
    pid, started = _me()
    journal = tmp_path / "broker-journal.db"
    StackInfo(pid, "127.0.0.1:1", "http://127.0.0.1:2", started, journal=str(journal)).write(
        tmp_path
    )
    assert apply_running_stack(Settings(home=tmp_path)).broker_journal == journal
    # an `up` on an external broker records none: nothing to journal
    StackInfo(pid, "kafka:9092", "http://127.0.0.1:2", started).write(tmp_path)
    assert apply_running_stack(Settings(home=tmp_path)).broker_journal is None


def test_up_hands_its_journal_to_its_worker_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kbstream.cli.running import _worker_env

    journal = tmp_path / "broker-journal.db"
    s = Settings(home=tmp_path, brokers="127.0.0.1:1", broker_journal=journal)
    assert _worker_env(s)["KBSTREAM_BROKER_JOURNAL"] == str(journal)
    # an external broker: none, not even one inherited from this environment
    monkeypatch.setenv("KBSTREAM_BROKER_JOURNAL", str(journal))
    external = Settings(home=tmp_path, brokers="kafka:9092", broker_journal=None)
    assert "KBSTREAM_BROKER_JOURNAL" not in _worker_env(external)


def test_a_verb_after_a_dead_up_cleans_up_and_runs_embedded(
    tmp_path: Path, sleeper: Sleeper
) -> None:
    orphan = sleeper()
    pid, started = _dead_pid()
    StackInfo(pid, "127.0.0.1:1", "http://127.0.0.1:2", started, [_record(orphan)]).write(tmp_path)
    s = apply_running_stack(Settings(home=tmp_path))
    assert (s.brokers, s.milvus_uri) == (None, None)
    assert orphan.wait(5) == -signal.SIGKILL
    assert not StackInfo.path(tmp_path).exists()


def test_a_verb_names_who_holds_the_milvus_dir_instead_of_waiting(tmp_path: Path) -> None:
    import fcntl

    data_dir = tmp_path / "milvus.db"
    data_dir.mkdir()
    fd = os.open(data_dir / "LOCK", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StackError) as err:
            apply_running_stack(Settings(home=tmp_path))
        message = str(err.value)
        assert message.startswith(f"milvus data dir {data_dir} is locked by pid {os.getpid()} (")
        assert "\n" not in message
    finally:
        os.close(fd)
    # released: the verb goes ahead
    assert apply_running_stack(Settings(home=tmp_path)).milvus_uri is None


def test_an_explicit_milvus_uri_is_left_alone(tmp_path: Path) -> None:
    s = Settings(home=tmp_path, milvus_uri="http://elsewhere:19530")
    assert apply_running_stack(s) == s
