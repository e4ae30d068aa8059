"""consumers/failpoints.py in a child process: a once-only point SIGKILLs the
first process that reaches it and no later one; an always point every time;
nothing fires unless enabled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def reach(point: str, **env: str) -> int:
    """Exit status of a child that reaches ``point`` then exits 0."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KBSTREAM_")}
    code = f"from consumers.failpoints import failpoint; failpoint({point!r})"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**clean, **env}, timeout=60
    ).returncode


def test_a_once_point_fires_once_per_marker_dir(tmp_path: Path) -> None:
    env = {"KBSTREAM_FAILPOINTS": "a.x, b.y", "KBSTREAM_FAILPOINT_MARKER_DIR": str(tmp_path)}
    assert reach("a.x", **env) == -signal.SIGKILL
    assert (tmp_path / "a.x").exists()
    assert reach("a.x", **env) == 0
    assert reach("c.z", **env) == 0  # not enabled
    (tmp_path / "a.x").unlink()  # armed again
    assert reach("a.x", **env) == -signal.SIGKILL


def test_an_always_point_fires_every_time() -> None:
    for _ in range(2):
        assert reach("a.x", KBSTREAM_FAILPOINTS_ALWAYS="a.x") == -signal.SIGKILL


def test_nothing_fires_when_not_enabled() -> None:
    assert reach("a.x") == 0


def test_once_points_need_a_marker_dir() -> None:
    assert reach("a.x", KBSTREAM_FAILPOINTS="a.x") == 1  # RuntimeError at import
