"""Stage workers as processes of `kbstream up` (``--workers STAGE=N``).

Threads of one process share one GIL: extraction, tokenizing, jieba, SQLite
and milvus-lite calls queue behind each other. ``--workers parse=2,split=2``
runs N `kbstream worker STAGE` processes per stage instead, each a member of
the stage's consumer group, exactly what N pods of that stage would be.

Workers are started with infra.children.spawn (they die with `up`, even by
SIGKILL) and get the stack's broker, Milvus server, database and home in
their environment. Unlike the broker and the Milvus server, a worker that
dies is restarted: it holds no state, the group hands its partitions to the
others meanwhile, and uncommitted events are redelivered. Restarts back off
(1 s, 2 s, 4 s ... 30 s; back to 1 s once a worker ran a minute) and each is
logged in one line. Stopping sends every worker SIGTERM (it finishes its
batch, commits and leaves the group), waits, then SIGKILLs what is left.

``--workers auto`` decides from os.cpu_count() (AUTO_RULE).

Metrics: with KBSTREAM_METRICS_PORT, `up` and its workers run in
prometheus-client's multiprocess mode (one port per container): `up` makes a
fresh directory (fresh_metrics_dir) and sets PROMETHEUS_MULTIPROC_DIR before
prometheus_client is imported (this module must not import it); workers get
it in their environment and serve no port. A worker that has joined its
group says so with a file, ready-PID, in that directory; when it exits the
supervisor removes the file and marks the pid dead, so its live gauges (lag,
stage_ready) leave the aggregate while its counters stay in it."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from consumers.pipeline import PIPELINE, Scaling, scaled
from infra import children

log = logging.getLogger(__name__)


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


# what each stage's Scaling (consumers/pipeline.py) means for `--workers auto`
AUTO_RULE = (
    f"auto: {_listed(scaled(Scaling.PROCESSES))} get max(1, min(partitions, cpus // 4)) "
    f"processes each; {_listed(scaled(Scaling.ONE_PROCESS))} one process each; "
    f"{_listed(scaled(Scaling.THREAD))} stays a thread"
)


class WorkersSpecError(ValueError):
    """A --workers value that cannot be used; the message is one line."""


def auto_workers(stages: Sequence[str], cpus: int | None, partitions: int) -> dict[str, int]:
    """AUTO_RULE for the stages that run."""
    wide = max(1, min(partitions, (cpus or 1) // 4))
    per_class = {Scaling.PROCESSES: wide, Scaling.ONE_PROCESS: 1}
    counts = {s.name: per_class[s.scaling] for s in PIPELINE if s.scaling in per_class}
    return {s: counts[s] for s in stages if s in counts}


def parse_workers(
    spec: str, stages: Sequence[str], cpus: int | None = None, partitions: int = 4
) -> dict[str, int]:
    """``parse=2,split=2`` (or ``auto``) -> {stage: processes}; stages must be in ``stages``."""
    if spec.strip() == "auto":
        return auto_workers(stages, cpus if cpus is not None else os.cpu_count(), partitions)
    counts: dict[str, int] = {}
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        stage, sep, n = item.partition("=")
        stage = stage.strip()
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise WorkersSpecError(f"--workers wants STAGE=N with N >= 1, or auto; not {item!r}")
        if stage not in stages:
            raise WorkersSpecError(
                f"--workers names {stage!r}, which is not a running stage ({', '.join(stages)})"
            )
        if stage in counts:
            raise WorkersSpecError(f"--workers names {stage!r} twice")
        counts[stage] = int(n)
    if not counts:
        raise WorkersSpecError("--workers is empty; give STAGE=N,... or auto")
    return counts


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def fresh_metrics_dir(home: Path) -> Path:
    """home/metrics, emptied: stale files of an earlier run (whose pids may be
    reused) would add to the counters. Left alone while another `up` of this
    home holds up.lock: it is that one's, and EmbeddedStack refuses to start."""
    path = home / "metrics"
    if not children.lock_holders(home / "up.lock"):
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def ready_file(metrics_dir: Path, pid: int) -> Path:
    """Present while worker ``pid`` has joined its group; holds its stage."""
    return metrics_dir / f"ready-{pid}"


def worker_command(stage: str) -> list[str]:
    """What a pod of ``stage`` runs, with this interpreter."""
    return [sys.executable, "-m", "kbstream.cli", "worker", stage]


@dataclass
class _Slot:
    stage: str
    n: int  # 1-based within its stage
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = 0  # consecutive deaths before running stable_after
    restart_at: float | None = None
    restarts: int = 0

    @property
    def name(self) -> str:
        return f"{self.stage}#{self.n}"


class WorkerSupervisor:
    """N worker processes per stage, restarted with backoff when they die."""

    def __init__(
        self,
        counts: Mapping[str, int],
        env: Mapping[str, str],
        command: Callable[[str], Sequence[str]] = worker_command,
        metrics_dir: Path | None = None,
        backoff: float = 1.0,
        backoff_cap: float = 30.0,
        stable_after: float = 60.0,
    ) -> None:
        self.env = dict(env)
        self.command = command
        self.metrics_dir = metrics_dir
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.stable_after = stable_after
        self.slots = [_Slot(stage, i + 1) for stage, n in counts.items() for i in range(n)]
        self.stopping = False

    def start(self) -> WorkerSupervisor:
        for slot in self.slots:
            self._spawn(slot)
        return self

    def _spawn(self, slot: _Slot) -> None:
        env = dict(self.env)
        env.pop("KBSTREAM_METRICS_PORT", None)  # `up` serves for its workers
        if self.metrics_dir is not None:
            env[MULTIPROC_ENV] = str(self.metrics_dir)
        slot.proc = children.spawn(self.command(slot.stage), env=env)
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("worker %s started (pid %d)", slot.name, slot.proc.pid)

    def poll(self) -> None:
        """Notice dead workers and restart those whose backoff is over."""
        if self.stopping:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    slot.restarts += 1
                    self._spawn(slot)
                continue
            rc = slot.proc.poll() if slot.proc is not None else None
            if slot.proc is None or rc is None:
                continue
            self._gone(slot.proc.pid)
            ran = now - slot.started
            slot.quick_deaths = 1 if ran >= self.stable_after else slot.quick_deaths + 1
            delay = min(self.backoff_cap, self.backoff * 2 ** (slot.quick_deaths - 1))
            slot.restart_at = now + delay
            log.warning(
                "worker %s (pid %d) %s after %.0fs; restarting in %.0fs (restart %d)",
                slot.name,
                slot.proc.pid,
                children.exit_reason(rc),
                ran,
                delay,
                slot.restarts + 1,
            )

    def _gone(self, pid: int) -> None:
        """A worker exited: its readiness and live gauges go with it."""
        if self.metrics_dir is None:
            return
        from prometheus_client import multiprocess  # `up` imported it already

        ready_file(self.metrics_dir, pid).unlink(missing_ok=True)
        multiprocess.mark_process_dead(pid, str(self.metrics_dir))

    def not_ready(self) -> dict[str, str]:
        """Workers not running, or (with a metrics dir) not yet in their group;
        for `up`'s /readyz. Safe from another thread."""
        out: dict[str, str] = {}
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.poll() is not None:
                out[f"worker {slot.name}"] = "not running (restart pending)"
            elif (
                self.metrics_dir is not None and not ready_file(self.metrics_dir, proc.pid).exists()
            ):
                out[f"worker {slot.name}"] = f"pid {proc.pid} has not joined its consumer group yet"
        return out

    def pids(self) -> dict[str, list[int]]:
        """Live worker pids per stage."""
        out: dict[str, list[int]] = {}
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                out.setdefault(slot.stage, []).append(slot.proc.pid)
        return out

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self.slots)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM every worker, wait up to ``grace`` seconds, SIGKILL the rest."""
        self.stopping = True
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop within %.0fs; killing it", proc.pid, grace)
                _signal_group(proc, signal.SIGKILL)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    log.error("worker pid %d survived SIGKILL", proc.pid)
        for proc in live:
            if proc.poll() is not None:
                self._gone(proc.pid)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # spawn gave it a session (and group) of its own
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.send_signal(sig)
