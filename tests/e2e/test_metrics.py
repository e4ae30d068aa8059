"""Metrics and health of a real `kbstream up` over HTTP: every contract metric
is exported, events are counted, consumer lag of every stage group goes to 0
once an index completes, /healthz and /readyz answer, JSON logs carry the
stage and document, and `kbstream top --once` shows each stage. With
`--workers`, the one port serves the aggregate of `up` and its worker
processes (prometheus-client multiprocess mode) and /readyz waits for them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.pipeline import STAGES
from infra import children
from infra.kafka.broker import free_port
from infra.metrics import CONTRACT_METRICS
from kbstream.processes import StackInfo
from tests.e2e.test_up_and_cli import KBSTREAM, REPO, kb, scrubbed_env
from tests.polling import poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")


@contextlib.contextmanager
def running_up(home: Path, env: dict[str, str], *args: str) -> Iterator[None]:
    """`kbstream up --home HOME ARGS` with ``env``, stopped (and checked to stop cleanly) after."""
    log = home.parent / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [KBSTREAM, "up", "--home", str(home), *args],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def live() -> bool:
            info = StackInfo.read_live(home)
            return info is not None and info.pid == proc.pid

        assert poll(lambda: live() or proc.poll() is not None, 180), log.read_text()
        assert live(), f"up did not come up:\n{log.read_text()}"
        yield
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening yet
        return 0, str(exc)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def lag_by_group(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, labels, value in samples(text):
        if name == "kbstream_consumer_lag":
            out[labels["group"]] = out.get(labels["group"], 0.0) + value
    return out


def by_stage(text: str, metric: str) -> dict[str, float]:
    return {lb["stage"]: v for n, lb, v in samples(text) if n == metric}


def test_metrics_health_lag_logs_and_top(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = scrubbed_env(KBSTREAM_METRICS_PORT=str(port), KBSTREAM_LOG_FORMAT="json")
    with running_up(home, env=env):
        # stack.json is written before the stages start, the port with them
        assert poll(lambda: get(f"{base}/healthz")[0] != 0, 120), get(f"{base}/healthz")
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert poll(lambda: get(f"{base}/readyz")[0] == 200, 120), get(f"{base}/readyz")

        summary = kb(
            "index", str(REPO / "examples" / "docs"), "--dataset", "ops", "--home", str(home),
            cwd=REPO, env=scrubbed_env(),
        )  # fmt: skip
        assert summary["completed"] == 3 and summary["failed"] == 0, summary

        status, text = get(f"{base}/metrics")
        assert status == 200
        names = {n for n, _, _ in samples(text)}
        missing = [m for m in CONTRACT_METRICS if not any(n.startswith(m) for n in names)]
        assert not missing, f"not exported: {missing}"
        # and what the Grafana dashboard queries, panel by panel
        board = json.loads((REPO / "deploy/grafana/dashboards/kbstream.json").read_text())
        queried = {
            re.sub(r"_(bucket|sum|count)$", "", m)
            for panel in board["panels"]
            for target in panel["targets"]
            for m in re.findall(r"\bkbstream_[A-Za-z0-9_:]+", target["expr"])
        }
        unscraped = sorted(m for m in queried if not any(n.startswith(m) for n in names))
        assert queried and not unscraped, f"dashboard queries what no worker exports: {unscraped}"
        events = {lb["stage"]: v for n, lb, v in samples(text) if n == "kbstream_events_total"}
        assert set(events) == set(STAGES) and all(v > 0 for v in events.values()), events
        segments = {lb["stage"]: v for n, lb, v in samples(text) if n == "kbstream_segments_total"}
        assert segments.get("split", 0) > 0 and segments.get("embed", 0) > 0, segments
        ready = {lb["stage"]: v for n, lb, v in samples(text) if n == "kbstream_stage_ready"}
        assert ready == dict.fromkeys(STAGES, 1.0), ready
        docs = {lb["status"]: v for n, lb, v in samples(text) if n == "kbstream_documents"}
        assert docs.get("completed") == 3, docs

        # every group reports its partitions, and each drains to 0 once the index completed
        def drained() -> bool:
            lag = lag_by_group(get(f"{base}/metrics")[1])
            return len(lag) == len(STAGES) and not any(lag.values())

        assert poll(drained, 60, interval=1.0), lag_by_group(get(f"{base}/metrics")[1])

        top = subprocess.run(
            [KBSTREAM, "top", "--once", "--interval", "0.5", "--home", str(home)],
            cwd=REPO, env=scrubbed_env(COLUMNS="200"), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert top.returncode == 0, top.stderr
        for stage in STAGES:
            row = next((ln for ln in top.stdout.splitlines() if f" {stage} " in ln), None)
            assert row is not None, top.stdout
            assert re.search(rf"{re.escape(stage)}\s+\S+\s+0\s", row), row  # lag 0
        assert "completed 3" in top.stdout, top.stdout

    # `kbstream index` (text format) appends to the same file as `up` (json)
    lines = (home / "kbstream.log").read_text().splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    staged = [r for r in logged if r.get("stage") == "split" and r.get("document")]
    assert staged, "no JSON log line names its stage and document"
    assert {"time", "level", "logger", "message", "event_id", "version"} <= set(staged[0])


def test_up_with_workers_serves_their_aggregate_on_its_one_port(tmp_path: Path) -> None:
    home = tmp_path / "home"
    metrics_dir = home / "metrics"  # PROMETHEUS_MULTIPROC_DIR of up and its workers
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = scrubbed_env(KBSTREAM_METRICS_PORT=str(port))
    with running_up(home, env, "--workers", "parse=2,embed=1"):
        assert poll(lambda: get(f"{base}/readyz")[0] == 200, 180), get(f"{base}/readyz")
        # ready means every worker process has joined its group too (its ready file)
        ready = {int(f.name.split("-")[1]): f.read_text() for f in metrics_dir.glob("ready-*")}
        assert sorted(ready.values()) == ["embed", "parse", "parse"], ready
        assert all(children.running(pid) for pid in ready), ready

        # a worker that exits is restarted: not ready meanwhile, its live gauges
        # leave the aggregate (marked dead), its counters stay
        victim = next(pid for pid, stage in ready.items() if stage == "parse")
        os.kill(victim, signal.SIGTERM)
        assert poll(lambda: "worker parse#" in get(f"{base}/readyz")[1], 60), get(f"{base}/readyz")
        assert poll(lambda: get(f"{base}/readyz")[0] == 200, 120), get(f"{base}/readyz")
        assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db"))
        assert (metrics_dir / f"counter_{victim}.db").exists()

        summary = kb(
            "index", str(REPO / "examples" / "docs"), "--dataset", "ops", "--home", str(home),
            cwd=REPO, env=scrubbed_env(),
        )  # fmt: skip
        assert summary["completed"] == 3 and summary["failed"] == 0, summary

        status, text = get(f"{base}/metrics")
        assert status == 200
        names = {n for n, _, _ in samples(text)}
        missing = [m for m in CONTRACT_METRICS if not any(n.startswith(m) for n in names)]
        assert not missing, f"not exported: {missing}"
        # parse and embed ran in worker processes only: their counts come from the files
        events = by_stage(text, "kbstream_events_total")
        assert set(events) == set(STAGES) and all(v > 0 for v in events.values()), events
        embedded = [v for n, _, v in samples(text) if n == "kbstream_embedded_texts_total"]
        assert embedded and embedded[0] > 0, embedded
        docs = {lb["status"]: v for n, lb, v in samples(text) if n == "kbstream_documents"}
        assert docs.get("completed") == 3, docs
        assert "pid" not in {k for n, lb, _ in samples(text) for k in lb}  # aggregated
        # a stage's ready gauge sums to its ready members, as over pods
        want = {**dict.fromkeys(STAGES, 1.0), "parse": 2.0}
        assert poll(lambda: by_stage(get(f"{base}/metrics")[1], "kbstream_stage_ready") == want, 30)

        def drained() -> bool:
            lag = lag_by_group(get(f"{base}/metrics")[1])
            return len(lag) == len(STAGES) and not any(lag.values())

        assert poll(drained, 60, interval=1.0), lag_by_group(get(f"{base}/metrics")[1])
