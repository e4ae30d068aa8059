"""One port per process (KBSTREAM_METRICS_PORT; per container for `kbstream up
--workers`, which answers for its worker processes too) for Prometheus and probes:

    GET /metrics   Prometheus text format
    GET /healthz   200 "ok" while the process is alive
    GET /readyz    200 once every stage loop of the process has joined its group
                   and the broker, database and Milvus answered at the last check;
                   else 503 and a JSON object naming what is not ready

Dependencies are checked by a background thread every ``interval`` seconds, not
per probe: a probe never waits on a slow database, and a scrape storm costs nothing."""

from __future__ import annotations

import json
import logging
import socketserver
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from infra.kafka import observe

log = logging.getLogger(__name__)

Check = Callable[[], object]  # raises when the dependency cannot be reached
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
NOT_CHECKED = "not checked yet"


class Readiness:
    """The last result of each dependency check, plus the stage loops' joins,
    plus what ``also`` names (`up`'s worker processes)."""

    def __init__(
        self,
        checks: Mapping[str, Check],
        interval: float = 5.0,
        also: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.checks = dict(checks)
        self.interval = interval
        self.also = also
        self.results: dict[str, str | None] = dict.fromkeys(self.checks, NOT_CHECKED)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_now(self) -> None:
        for name, check in self.checks.items():
            try:
                check()
                self.results[name] = None
            except Exception as exc:
                if self.results.get(name) is None:  # log the change, not every failure
                    log.warning("readiness: %s is not reachable: %s", name, exc)
                self.results[name] = f"{type(exc).__name__}: {exc}"[:300]

    def start(self) -> Readiness:
        def loop() -> None:
            while True:
                self.check_now()
                if self._stop.wait(self.interval):
                    return

        self._thread = threading.Thread(target=loop, name="readiness", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def not_ready(self) -> dict[str, str]:
        """What is not ready and why; empty when ready."""
        out = {
            f"stage {o.stage}": f"has not joined consumer group {o.group} yet"
            for o in observe.loops()
            if not o.ready.is_set()
        }
        out.update({name: why for name, why in self.results.items() if why is not None})
        if self.also is not None:
            out.update(self.also())
        return out


def loops_ready() -> bool:
    """Every stage loop of this process has joined its group (and there is one)."""
    current = observe.loops()
    return bool(current) and all(o.ready.is_set() for o in current)


def make_app(
    readiness: Readiness | None, registry: CollectorRegistry = REGISTRY
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            return _reply(start_response, "200 OK", b"ok\n", "text/plain; charset=utf-8")
        if path == "/readyz":
            missing = readiness.not_ready() if readiness is not None else {}
            if missing:
                body = json.dumps({"ready": False, "not_ready": missing}).encode()
                return _reply(start_response, "503 Service Unavailable", body, "application/json")
            return _reply(start_response, "200 OK", b'{"ready": true}', "application/json")
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        return _reply(start_response, "404 Not Found", b"not found\n", "text/plain")

    return app


def _reply(start: StartResponse, status: str, body: bytes, ctype: str) -> list[bytes]:
    start(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a hung client never keeps the process alive


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
        pass


def serve(
    port: int,
    readiness: Readiness | None = None,
    addr: str = "0.0.0.0",
    registry: CollectorRegistry = REGISTRY,
) -> WSGIServer:
    """Serve /metrics (from ``registry``), /healthz and /readyz on ``port`` from a daemon thread."""
    server = make_server(
        addr, port, make_app(readiness, registry), server_class=_Server, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", addr, port)
    return server
