"""The embedded stack's processes: what `kbstream up` starts, records and
cleans up, and how every other verb finds it.

`kbstream up` (EmbeddedStack) holds an flock on home/up.lock while it runs,
so a second `up` for the same home fails at once, and the kernel drops the
lock however `up` ends. It starts a milvus-lite server (unless
KBSTREAM_MILVUS_URI is set) and a tansu broker (unless KBSTREAM_BROKERS is)
as children that die with it, even by SIGKILL (infra.children), and writes
home/stack.json: its pid and start time, the addresses, and each child's pid
and start time.

A stack.json whose pid is gone, or names another program now (its start time
differs), is stale. The next `up`, or any verb, kills the children it records
that are still those same processes, and removes it. A milvus data dir
locked by anyone else is never taken over: opening it fails at once, naming
the holder in one line.

The tansu broker keeps its topics in memory; what kbstream's producers
published to it is also in the home's broker journal (kbstream.journal), so
a new `up` replays the events the last one acknowledged and did not finish
into its new broker before any stage starts, however the last one ended.

A child that dies while `up` runs (killed, crashed) stops `up`: it says which
one in one line and exits non-zero. It is not restarted in place: the
workers hold connections to the old ports, and a new broker must first get
the journal's events; restarting the whole `up` (by hand, systemd, a pod)
is the honest recovery. Stage worker processes (`up --workers`) are the
opposite: stateless, restarted with backoff (kbstream.supervisor).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domain.errors import KbstreamError
from infra import children
from infra.kafka.broker import EmbeddedBroker, free_port
from kbstream import journal

if TYPE_CHECKING:
    import subprocess

    from kbstream.settings import Settings

log = logging.getLogger(__name__)


class StackError(KbstreamError):
    """The embedded stack cannot start or stopped; the message is one line."""


@dataclass
class ChildRecord:
    name: str
    pid: int
    started: int | None


@dataclass
class StackInfo:
    """home/stack.json: how verbs reach a running `kbstream up`."""

    pid: int
    brokers: str
    milvus_uri: str
    started: int | None = None  # /proc start time of pid; None: unknown (no /proc)
    children: list[ChildRecord] = field(default_factory=list)
    journal: str | None = None  # the embedded broker's journal; None: an external broker

    @property
    def journal_path(self) -> Path | None:
        return Path(self.journal) if self.journal else None

    @staticmethod
    def path(home: Path) -> Path:
        return home / "stack.json"

    def write(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f".stack.json.{os.getpid()}"
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, self.path(home))  # readers never see half a file

    @classmethod
    def read(cls, home: Path) -> StackInfo | None:
        """What stack.json says, live or not; None if absent or unreadable."""
        try:
            data = json.loads(cls.path(home).read_text())
            data["children"] = [ChildRecord(**c) for c in data.get("children", [])]
            return cls(**data)
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def alive(self) -> bool:
        return children.running(self.pid, self.started)

    @classmethod
    def read_live(cls, home: Path) -> StackInfo | None:
        info = cls.read(home)
        return info if info is not None and info.alive() else None


def reap_stale(home: Path) -> list[str]:
    """Remove a stale stack.json, first killing the children it records that
    are still running (same pid, same start time). Returns who was killed."""
    path = StackInfo.path(home)
    if not path.exists():
        return []
    info = StackInfo.read(home)
    if info is not None and info.alive():
        return []
    killed = []
    for child in info.children if info is not None else []:
        if not children.running(child.pid, child.started):
            continue
        who = children.describe(child.pid)
        if not children.kill(child.pid, child.started):
            raise StackError(f"cannot stop {who}, left running by a dead kbstream up for {home}")
        log.warning("stopped %s, left running by a dead kbstream up for %s", who, home)
        killed.append(who)
    path.unlink(missing_ok=True)
    return killed


def _up_lock(home: Path) -> Path:
    return home / "up.lock"


def _already_running(home: Path) -> StackError:
    info = StackInfo.read_live(home)
    pids = [info.pid] if info else children.lock_holders(_up_lock(home))
    who = f" ({', '.join(children.describe(p) for p in pids)})" if pids else ""
    return StackError(f"a kbstream up is already running for {home}{who}")


def apply_running_stack(settings: Settings, wait_starting: float = 60.0) -> Settings:
    """The settings a verb should use. Beside a running `kbstream up` that is
    up's Milvus server and broker: the milvus-lite data dir can be open in one
    process only. Otherwise the embedded milvus-lite file, after cleaning up
    what a dead `up` left behind; if another process holds that file, fail
    now with its name instead of retrying forever."""
    home = settings.home
    if not settings.brokers and not settings.milvus_uri:
        info = StackInfo.read_live(home)
        deadline = time.monotonic() + wait_starting
        while info is None and children.is_locked(_up_lock(home)):  # `up` is starting
            if time.monotonic() > deadline:
                raise StackError(f"kbstream up for {home} is still starting; try again shortly")
            time.sleep(0.2)
            info = StackInfo.read_live(home)
        if info is not None:
            return settings.model_copy(
                update={
                    "milvus_uri": info.milvus_uri,
                    "brokers": info.brokers,
                    "broker_journal": info.journal_path,
                }
            )
    if not settings.milvus_uri:
        reap_stale(home)
        reason = children.milvus_dir_locked(home / "milvus.db")
        if reason:
            raise StackError(reason)
    return settings


class MilvusLiteServer:
    """milvus-lite as a gRPC server over the same data directory as the
    embedded file, so several processes can share it. It dies with the
    process that started it."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """None while the server runs (or was never started), else its exit status."""
        return self._proc.poll() if self._proc else None

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / "milvus-server.log"

    def start(self, timeout: float = 60.0) -> MilvusLiteServer:
        reason = children.milvus_dir_locked(self.data_dir)
        if reason:
            raise StackError(reason)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # milvus-lite's own command line, with BM25 over a dataset's statistics
        # (infra/milvus_lite_bm25.py)
        cmd = [
            sys.executable,
            "-m",
            "infra.milvus_lite_bm25",
            "server",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        with open(self.log_file, "ab") as out:
            self._proc = children.spawn(cmd, stdout=out, stderr=out)
        from pymilvus import MilvusClient

        from infra.milvus import grpc_options

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                raise StackError(
                    f"milvus-lite server {children.exit_reason(rc)} while starting: "
                    f"{self._last_log_line()} (see {self.log_file})"
                )
            try:
                probe = MilvusClient(uri=self.uri, timeout=2, grpc_options=grpc_options(self.uri))
                try:
                    probe.list_collections()
                finally:
                    probe.close()
                return self
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise StackError(f"milvus-lite server did not start on {self.uri} within {timeout:.0f}s")

    def _last_log_line(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    def stop(self) -> None:
        # SIGINT: milvus-lite drains its requests and closes the data dir
        children.stop(self._proc)
        self._proc = None


class EmbeddedStack:
    """`kbstream up`'s processes, as a context manager. Entering takes
    home/up.lock, cleans up a dead `up`'s leftovers, starts what settings
    leave to it and writes stack.json; leaving undoes all of it. Both raise
    StackError with a one-line reason."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home
        self.milvus: MilvusLiteServer | None = None
        self.broker: EmbeddedBroker | None = None
        self._lock_fd: int | None = None

    @property
    def bootstrap(self) -> str:
        assert self.settings.brokers is not None, "not entered"
        return self.settings.brokers

    @property
    def milvus_uri(self) -> str:
        return self.settings.vector_uri

    def __enter__(self) -> EmbeddedStack:
        try:
            self._start()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _start(self) -> None:
        import fcntl

        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(_up_lock(self.home), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _already_running(self.home) from None
        self._lock_fd = fd
        if StackInfo.read_live(self.home):  # an `up` that predates up.lock
            raise _already_running(self.home)
        reap_stale(self.home)
        update: dict[str, Any] = {}
        if not self.settings.milvus_uri:
            self.milvus = MilvusLiteServer(self.home / "milvus.db").start()
            update["milvus_uri"] = self.milvus.uri
        if not self.settings.brokers:
            self.broker = EmbeddedBroker(log_file=self.home / "broker.log").start()
            update["brokers"] = self.broker.bootstrap
            # before stack.json: nobody may publish to the broker before the replay
            try:
                update["broker_journal"] = journal.take_over(self.settings, self.broker.bootstrap)
            except Exception as exc:
                raise StackError(
                    f"cannot replay the broker journal {journal.journal_path(self.home)} "
                    f"into the new broker: {exc}"
                ) from exc
        self.settings = self.settings.model_copy(update=update)
        recorded = [
            ChildRecord(name, pid, children.start_time(pid))
            for name, pid in (
                ("milvus-lite server", self.milvus and self.milvus.pid),
                ("tansu broker", self.broker and self.broker.pid),
            )
            if pid
        ]
        StackInfo(
            pid=os.getpid(),
            started=children.start_time(os.getpid()),
            brokers=self.bootstrap,
            milvus_uri=self.milvus_uri,
            children=recorded,
            journal=str(self.settings.broker_journal) if self.settings.broker_journal else None,
        ).write(self.home)

    def dead_child(self) -> str | None:
        """One line saying which child died, or None while all run."""
        for name, child in (("milvus-lite server", self.milvus), ("tansu broker", self.broker)):
            rc = child.poll() if child is not None else None
            if child is not None and rc is not None:
                return (
                    f"the {name} (pid {child.pid}) {children.exit_reason(rc)}; "
                    "kbstream up stops, start it again"
                )
        return None

    def wait(
        self,
        stop: threading.Event,
        alive: Callable[[], bool] | None = None,
        interval: float = 0.5,
    ) -> str | None:
        """Until ``stop`` is set (None), or a child or ``alive`` dies (why, in
        one line). Keeps the broker journal meanwhile."""
        next_upkeep = time.monotonic() + journal.TRIM_INTERVAL_S
        while not stop.wait(interval):
            reason = self.dead_child()
            if reason:
                return reason
            if alive is not None and not alive():
                return "a stage worker died; kbstream up stops"
            if time.monotonic() >= next_upkeep:
                self.keep_journal()
                next_upkeep = time.monotonic() + journal.TRIM_INTERVAL_S
        return None

    def keep_journal(self, replay: bool = True) -> None:
        if self.broker is not None and self.broker.poll() is None:
            journal.upkeep(self.settings, self.bootstrap, replay=replay)

    def _close(self) -> None:
        # stack.json first: no verb may pick up a stack that is going away
        info = StackInfo.read(self.home)
        if info is not None and info.pid == os.getpid():
            StackInfo.path(self.home).unlink(missing_ok=True)
        if self.broker is not None:
            if self.settings.broker_journal is not None:
                self.keep_journal(replay=False)  # the workers have stopped and committed
            self.broker.stop()
        if self.milvus is not None:
            self.milvus.stop()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
