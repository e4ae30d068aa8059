"""infra.children: a spawned child dies with its parent, even when the
parent is SIGKILLed, whether it was spawned from the main thread or from a
thread that has since exited; with prctl, and with the watchdog used where
prctl is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from infra import children
from tests.polling import poll

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# A parent that spawns `sleep` from a short-lived thread, prints the child's
# pid, and waits to be killed.
PARENT = """
import sys, threading, time
from infra import children
if sys.argv[1] == "watchdog":
    children._PDEATHSIG = False
out = []
t = threading.Thread(target=lambda: out.append(children.spawn(["sleep", "300"])))
t.start()
t.join()
print(out[0].pid, children.start_time(out[0].pid), flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("mode", ["prctl", "watchdog"])
def test_a_child_dies_when_its_parent_is_sigkilled(mode: str) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pid, started = 0, None
    try:
        assert parent.stdout is not None
        pid_s, started_s = parent.stdout.readline().split()
        pid, started = int(pid_s), int(started_s)
        # the thread that spawned it has exited; the child must live on
        assert not poll(lambda: not children.running(pid, started), 1.0)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert children.wait_gone(pid, started, 5), f"{mode}: child outlived its killed parent"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
        if pid:
            children.kill(pid, started)  # never leave it behind, even when the test fails
        parent.stdout.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["prctl", "watchdog"])
def test_stop_and_exit_status(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if mode == "watchdog":
        monkeypatch.setattr(children, "_PDEATHSIG", False)
    done = children.spawn(["sh", "-c", "exit 3"])
    assert done.wait(10) == 3
    # a child that ignores SIGINT and SIGTERM is killed at the last step
    stubborn = children.spawn(
        ["sh", "-c", "trap '' INT TERM; echo ready; sleep 300 & wait"], stdout=subprocess.PIPE
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    children.stop(
        stubborn,
        [(signal.SIGINT, 0.5), (signal.SIGTERM, 0.5), (signal.SIGKILL, 5)],
    )
    assert stubborn.returncode == -signal.SIGKILL
    stubborn.stdout.close()
    # the whole group went: no `sleep 300` of that session is left
    assert poll(lambda: not _group(stubborn.pid), 5), _group(stubborn.pid)


def test_spawning_from_a_thread_uses_one_long_lived_thread() -> None:
    out: list[subprocess.Popen[bytes]] = []
    t = threading.Thread(target=lambda: out.append(children.spawn(["sleep", "300"])))
    t.start()
    t.join()
    try:
        forkers = [th for th in threading.enumerate() if th.name == "child-forker"]
        assert len(forkers) == 1 and forkers[0].daemon
        assert out[0].poll() is None
    finally:
        children.stop(out[0])
    assert out[0].returncode is not None


def _group(pgid: int) -> list[str]:
    """Running members of a process group, by command line."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(p)) == pgid and children.running(int(p)):
                out.append(children.describe(int(p)))
        except OSError:
            continue
    return out
