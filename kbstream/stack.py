"""Running the pipeline: stage workers as threads of this process (the
embedded default and `kbstream up`), and finding the broker a verb should use.

Order of preference for a broker: KBSTREAM_BROKERS; else a running
`kbstream up` for the same home (home/stack.json); else an embedded tansu
broker started for the duration of the command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from consumers import STAGES
from infra.kafka.broker import EmbeddedBroker, free_port
from infra.kafka.runner import StageRunner, run_until_stopped
from infra.kafka.topics import ensure_topics
from kbstream.bootstrap import Container
from kbstream.settings import Settings

log = logging.getLogger(__name__)


class WorkerPool:
    """Every requested stage as its own consumer group, one thread each."""

    def __init__(
        self,
        container: Container,
        bootstrap: str,
        stages: Sequence[str] = STAGES,
        exclusive: bool = False,
    ) -> None:
        self.container = container
        self.bootstrap = bootstrap
        self.exclusive = exclusive
        self.stages = list(stages)
        self.runners: list[StageRunner] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> WorkerPool:
        s = self.container.settings
        if "embed" in self.stages:
            # load the model while the consumer groups join (~3 s) and the first
            # documents are parsed and split: it is on the critical path otherwise
            threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        ensure_topics(self.bootstrap, self.container.topics, s.partitions, s.replication_factor)
        for name in self.stages:
            runner = self.container.runner(name, self.bootstrap, exclusive=self.exclusive)
            t = threading.Thread(
                target=run_until_stopped, args=(runner,), name=f"stage-{name}", daemon=True
            )
            self.runners.append(runner)
            self.threads.append(t)
            t.start()
        return self

    def _warm_up(self) -> None:
        try:
            self.container.provider.warm_up()
        except Exception:  # the embed stage reports the real error when it needs the model
            log.warning("embedding model warm-up failed", exc_info=True)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(r.ready.wait(max(0.0, deadline - time.monotonic())) for r in self.runners)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def stop(self, timeout: float = 30.0) -> None:
        for r in self.runners:
            r.stop()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))


@dataclass
class StackInfo:
    pid: int
    brokers: str
    milvus_uri: str

    @staticmethod
    def path(home: Path) -> Path:
        return home / "stack.json"

    def write(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.path(home).write_text(json.dumps(self.__dict__))

    @classmethod
    def read_live(cls, home: Path) -> StackInfo | None:
        p = cls.path(home)
        if not p.exists():
            return None
        try:
            info = cls(**json.loads(p.read_text()))
            os.kill(info.pid, 0)
        except (OSError, ValueError, TypeError):
            return None
        return info


@dataclass
class Runtime:
    bootstrap: str
    embedded: bool  # True: this process must run the workers itself


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[Runtime]:
    """The broker this command talks to; starts an embedded one if none."""
    if settings.brokers:
        yield Runtime(settings.brokers, embedded=False)
        return
    info = StackInfo.read_live(settings.home)
    if info is not None:
        yield Runtime(info.brokers, embedded=False)
        return
    settings.home.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(log_file=settings.home / "broker.log").start()
    try:
        yield Runtime(broker.bootstrap, embedded=True)
    finally:
        broker.stop()


def apply_running_stack(settings: Settings) -> Settings:
    """A verb run beside `kbstream up` must use up's Milvus server: the
    milvus-lite file can be open in one process only."""
    if settings.brokers or settings.milvus_uri:
        return settings
    info = StackInfo.read_live(settings.home)
    if info is None:
        return settings
    return settings.model_copy(update={"milvus_uri": info.milvus_uri, "brokers": info.brokers})


class MilvusLiteServer:
    """milvus-lite as a gRPC server over the same data directory as the
    embedded file, so several processes can share it."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> MilvusLiteServer:
        exe = Path(sys.executable).with_name("milvus-lite")
        cmd = [
            str(exe) if exe.exists() else "milvus-lite",
            "server",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        log_file = open(self.data_dir.parent / "milvus-server.log", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, start_new_session=True)
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"milvus-lite server exited with {self._proc.returncode}; see milvus-server.log"
                )
            try:
                MilvusClient(uri=self.uri, timeout=2).list_collections()
                return self
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"milvus-lite server did not start on {self.uri}")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None
