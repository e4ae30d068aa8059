"""Polling for a condition, for tests that wait on asynchronous stages."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll(pred: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """True as soon as ``pred()`` is, False if it still is not after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
