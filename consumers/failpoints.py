"""Fail points: named places where a test can SIGKILL the process, to prove
that every commit/publish boundary is crash-exact (tests/e2e/test_failpoints.py).

Off unless the environment enables them, read once at import:

    KBSTREAM_FAILPOINTS="split.after_handle,embed.after_publish"
        each fires at most once per KBSTREAM_FAILPOINT_MARKER_DIR: the first
        process to reach it creates DIR/<name> (O_EXCL) and dies; while that
        file exists the point does nothing (deleting it arms the point again)
    KBSTREAM_FAILPOINTS_ALWAYS="parse.before_handle"
        fire every time they are reached

Points: ``{stage}.before_handle``, ``{stage}.after_handle`` (the stage has
committed, nothing is published), ``{stage}.after_publish`` (published,
offsets not committed), and ``parse.after_claim`` (between parse's claim and
result transactions). Stdlib only: consumers must not import infra.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)


def _names(variable: str) -> frozenset[str]:
    return frozenset(n.strip() for n in os.environ.get(variable, "").split(",") if n.strip())


_ONCE = _names("KBSTREAM_FAILPOINTS")
_ALWAYS = _names("KBSTREAM_FAILPOINTS_ALWAYS")
_ENABLED = _ONCE | _ALWAYS
_MARKERS = os.environ.get("KBSTREAM_FAILPOINT_MARKER_DIR", "")
if _ONCE and not _MARKERS:
    raise RuntimeError("KBSTREAM_FAILPOINTS needs KBSTREAM_FAILPOINT_MARKER_DIR")


def failpoint(name: str) -> None:
    """SIGKILL this process here if the point ``name`` is enabled (and, for a
    once-only point, has not fired yet). Costs one set lookup otherwise."""
    if name in _ENABLED:
        _fire(name)


def _fire(name: str) -> None:
    if name not in _ALWAYS:
        try:
            fd = os.open(os.path.join(_MARKERS, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # fired already
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    log.critical("failpoint %s: SIGKILL pid %d", name, os.getpid())
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
