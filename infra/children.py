"""Child processes that die with their parent, and who holds what.

A helper process kbstream starts (the tansu broker, a milvus-lite server)
must not outlive it: an orphaned milvus-lite server keeps the data dir
locked and the next `kbstream up` cannot start. On Linux the child asks the
kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG): a tiny
Python launcher sets it and execs the command, keeping the pid. Not a
preexec_fn: that forces a real fork() whose atfork handlers restart gRPC's
poller threads (pymilvus) in the child, which then abort; without it Popen
uses vfork. The signal fires when the *thread* that forked exits, not the
process, so children are forked from the main thread or from one daemon
thread that lives as long as the process. Where prctl is missing (macOS),
the child runs under a small watchdog process that kills it when its parent
is gone.

Every child leads its own session (Ctrl-C in the terminal must not kill it
before its parent has drained), so it is signalled as a process group.

Also here: a process's start time, which tells a live pid from a reused one,
and the pid that holds an flock on a file, so an error can name it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _has_prctl() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(None).prctl  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


_PDEATHSIG = _has_prctl()

# argv: parent pid, command... The parent may die before prctl takes effect:
# then no signal will ever come, so check it is still our parent afterwards.
_LAUNCHER = """
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
signal.signal(signal.SIGINT, signal.SIG_DFL)  # inherited as ignored when started in the background
os.execvp(sys.argv[2], sys.argv[2:])
"""

# Run by the watchdog where prctl is missing: it starts the real command as
# its own child, passes its exit status on, and kills its whole process group
# (itself and the command) once its parent is gone.
_WATCHDOG = """
import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
for sig in (signal.SIGINT, signal.SIGTERM):  # the group signal reaches the command too
    signal.signal(sig, lambda *_: None)  # a handler, unlike SIG_IGN, is not inherited
child = subprocess.Popen(sys.argv[2:])
while True:
    try:
        rc = child.wait(0.5)
        break
    except subprocess.TimeoutExpired:
        if os.getppid() != parent:
            os.killpg(0, signal.SIGKILL)
if rc < 0:
    signal.signal(-rc, signal.SIG_DFL)
    os.kill(os.getpid(), -rc)
sys.exit(rc)
"""


_forker: tuple[int, queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]] | None = None
_forker_lock = threading.Lock()


def _serve(q: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
    while True:
        fn, fut = q.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller
                fut.set_exception(exc)


def _from_long_lived_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that lives as long as the process."""
    global _forker
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _forker_lock:
        if _forker is None or _forker[0] != os.getpid():  # none yet, or we are a fork
            q: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(q,), name="child-forker", daemon=True).start()
            _forker = (os.getpid(), q)
        q = _forker[1]
    fut: Future[T] = Future()
    q.put((fn, fut))
    return fut.result()


def spawn(cmd: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Popen(cmd) in a session of its own, killed when this process dies."""
    popen["start_new_session"] = True
    wrapper = _LAUNCHER if _PDEATHSIG else _WATCHDOG
    argv = [sys.executable, "-I", "-S", "-c", wrapper, str(os.getpid()), *cmd]
    return _from_long_lived_thread(lambda: subprocess.Popen(argv, **popen))


def stop(
    proc: subprocess.Popen[bytes] | None,
    steps: Sequence[tuple[signal.Signals, float]] = (
        (signal.SIGINT, 5.0),
        (signal.SIGTERM, 5.0),
        (signal.SIGKILL, 5.0),
    ),
) -> None:
    """Signal a spawned child's process group, escalating until it exits."""
    if proc is None:
        return
    for sig, wait in steps:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


# -- identity of a process ---------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks after boot); None without /proc."""
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def running(pid: int, started: int | None = None) -> bool:
    """The process exists, is not a zombie, and, when ``started`` is given,
    is the same process that was recorded (not a reuse of its pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    fields = _stat(pid)
    if fields is None:
        return started is None and not Path("/proc/self/stat").exists()
    if started is not None and int(fields[19]) != started:
        return False
    if fields[0] in ("Z", "X"):
        # a dead leader whose other threads still exit holds its files (and locks)
        return any(_state(pid, t) not in ("Z", "X", None) for t in _tasks(pid))
    return True


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _state(pid: int, tid: str) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()[0]


def describe(pid: int) -> str:
    """``pid 1234 (milvus-lite server --data-dir ...)``, for error messages."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        words = [a.decode(errors="replace") for a in argv if a]
    except OSError:
        words = []
    # `python /venv/bin/milvus-lite server ...` reads better as `milvus-lite server ...`
    if len(words) > 1 and Path(words[0]).name.startswith("python") and words[1] != "-c":
        words = words[1:]
    if words:
        words[0] = Path(words[0]).name
    cmd = " ".join(" ".join(words).split())  # one line, whatever the arguments hold
    return f"pid {pid} ({cmd[:120]})" if cmd else f"pid {pid}"


def wait_gone(pid: int, started: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while running(pid, started):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill(pid: int, started: int | None, timeout: float = 5.0) -> bool:
    """SIGKILL the process if it is still the recorded one; True once it is gone."""
    if not running(pid, started):
        return True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return wait_gone(pid, started, timeout)


# -- file locks --------------------------------------------------------------------


def is_locked(path: Path) -> bool:
    """Another open file holds an flock on ``path`` (milvus-lite's LOCK file)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops our probe lock, if we got it
    return False


def lock_holders(path: Path) -> list[int]:
    """Pids holding an flock on ``path``: /proc/locks, else the open fds of /proc."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
                pid = int(parts[4])
                if pid > 0 and running(pid) and pid not in pids:
                    pids.append(pid)
    if pids:
        return pids
    # the locker may have died leaving the lock to a child it forked
    target = os.path.realpath(path)
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                for fd in os.scandir(f"/proc/{entry.name}/fd"):
                    if os.readlink(fd.path) == target:
                        pids.append(int(entry.name))
                        break
    return pids


def locked_by(path: Path) -> str | None:
    """None if ``path`` is free, else who holds it, e.g. ``pid 1234 (milvus-lite server ...)``."""
    if not is_locked(path):
        return None
    pids = lock_holders(path)
    return ", ".join(describe(p) for p in pids) if pids else "another process"


def milvus_dir_locked(data_dir: Path) -> str | None:
    """The one-line reason a milvus-lite data dir cannot be opened here, if it cannot."""
    holder = locked_by(Path(data_dir) / "LOCK")
    if holder is None:
        return None
    return (
        f"milvus data dir {data_dir} is locked by {holder}; stop that process, "
        "or point KBSTREAM_MILVUS_URI at a running Milvus"
    )
