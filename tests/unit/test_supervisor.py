"""`kbstream up --workers`: the flag's grammar and the supervision of worker
processes (restart with backoff, graceful stop), on real child processes
that stand in for `kbstream worker` (a sleeping Python)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from functools import partial

import pytest

from consumers.pipeline import STAGES
from infra import children
from kbstream.supervisor import WorkersSpecError, WorkerSupervisor, parse_workers
from tests.polling import poll

SLEEPER = "import time\nwhile True: time.sleep(0.1)"
# ignores SIGTERM: stop() must escalate to SIGKILL
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + SLEEPER


def sleeper(_stage: str) -> list[str]:
    return [sys.executable, "-c", SLEEPER]


def members(sup: WorkerSupervisor) -> int:
    sup.poll()
    return len(sup.pids().get("split", []))


def gone(sup: WorkerSupervisor, pid: int) -> bool:
    sup.poll()
    return pid not in sup.pids().get("split", [])


def test_workers_spec_is_stage_counts() -> None:
    assert parse_workers("parse=2, split=3,embed=1", STAGES) == {"parse": 2, "split": 3, "embed": 1}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("parse", "STAGE=N"),
        ("parse=0", "N >= 1"),
        ("parse=x", "STAGE=N"),
        ("bogus=2", "not a running stage"),
        ("parse=1,parse=2", "twice"),
        (" , ", "empty"),
    ],
)
def test_bad_workers_spec_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(WorkersSpecError, match=message) as info:
        parse_workers(spec, STAGES)
    assert "\n" not in str(info.value)


def test_a_stage_that_does_not_run_cannot_get_workers() -> None:
    with pytest.raises(WorkersSpecError, match="not a running stage"):
        parse_workers("embed=2", ["parse", "split"])


def test_auto_scales_the_text_stages_with_cores_up_to_the_partitions() -> None:
    assert parse_workers("auto", STAGES, cpus=2, partitions=4) == {
        "parse": 1,
        "split": 1,
        "embed": 1,
        "load_vectors": 1,
        "index_keywords": 1,
    }
    sixteen = parse_workers("auto", STAGES, cpus=16, partitions=12)
    assert (sixteen["parse"], sixteen["split"], sixteen["index_keywords"]) == (4, 4, 4)
    assert (sixteen["embed"], sixteen["load_vectors"]) == (1, 1)
    assert "track_status" not in sixteen  # stays a thread
    assert parse_workers("auto", STAGES, cpus=64, partitions=4)["split"] == 4
    assert parse_workers("auto", ["split", "track_status"], cpus=8) == {"split": 2}


def test_dead_worker_is_restarted_with_backoff_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = WorkerSupervisor({"split": 2}, os.environ, command=sleeper, backoff=0.3, backoff_cap=0.6)
    sup.start()
    try:
        first = sup.pids()["split"]
        assert len(first) == 2
        victim = first[0]
        caplog.set_level(logging.WARNING, "kbstream.supervisor")
        for round_ in range(3):
            pid = sup.pids()["split"][0]
            os.kill(pid, signal.SIGKILL)
            assert poll(partial(gone, sup, pid), 5)
            t0 = time.monotonic()
            assert poll(lambda: members(sup) == 2, 10)
            waited = time.monotonic() - t0
            # 0.3 s, then 0.6 s, then capped at 0.6 s: a worker that keeps dying is not hammered
            assert waited >= min(0.6, 0.3 * 2**round_) - 0.15, (round_, waited)
        assert victim not in sup.pids()["split"]
        assert first[1] in sup.pids()["split"]  # the other member was left alone
        assert sup.restarts == 3
        lines = [r.getMessage() for r in caplog.records if r.name == "kbstream.supervisor"]
        assert len(lines) == 3 and all("\n" not in m for m in lines)
        assert "worker split#1" in lines[0] and "was killed by SIGKILL" in lines[0]
        assert "restart 3" in lines[2]
    finally:
        sup.stop(grace=5)
    assert sup.pids() == {}


def test_stop_sends_sigterm_then_sigkill() -> None:
    sup = WorkerSupervisor(
        {"parse": 1, "embed": 1},
        os.environ,
        command=lambda s: [sys.executable, "-c", STUBBORN if s == "embed" else SLEEPER],
    ).start()
    # let the stubborn one install its handler
    time.sleep(1.0)
    procs = {s.stage: s.proc for s in sup.slots}
    t0 = time.monotonic()
    sup.stop(grace=1.0)
    assert time.monotonic() - t0 < 8
    assert procs["parse"] is not None and procs["parse"].returncode == -signal.SIGTERM
    assert procs["embed"] is not None and procs["embed"].returncode == -signal.SIGKILL
    sup.poll()  # stopping: nothing is restarted
    assert sup.pids() == {}
    assert all(not children.running(p.pid) for p in procs.values() if p is not None)
