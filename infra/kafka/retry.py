"""The retry policy, in one place: how long to wait before the next attempt,
and what to do after a failure.

* TransientError (a dependency down or throttling): retry the same batch, for
  as long as it takes; the event is fine, the world is not.
* any other error in a batch of several events: isolate, i.e. retry them one
  at a time, so the rest of the batch does not suffer for one bad event;
* any other error on one event: retry it up to ``attempts`` times in all,
  then dead-letter it; a PermanentError is dead-lettered at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from domain.errors import PermanentError, TransientError


class Action(Enum):
    RETRY = "retry"
    ISOLATE = "isolate"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff: ``min(cap, base * 2**attempt)``, jittered.

    ``jitter="equal"`` (the default) waits between half and all of that, so a
    retry never comes back at once yet many workers retrying together spread
    out; ``"full"`` waits anywhere between 0 and all of it (spreads best, but
    may retry immediately)."""

    attempts: int = 6
    base: float = 0.2
    cap: float = 30.0
    jitter: Literal["full", "equal"] = "equal"

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base <= 0 or self.cap <= 0:
            raise ValueError(f"invalid retry policy {self}")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the ``attempt``-th failure (1-based)."""
        ceiling = min(self.cap, self.base * 2 ** min(max(attempt, 1), 30))
        if self.jitter == "full":
            return ceiling * rand()
        return ceiling / 2 + ceiling / 2 * rand()

    def decide(self, error: BaseException, batch_size: int, attempts: int) -> Action:
        """After ``error`` on a batch of ``batch_size`` events that has now
        failed ``attempts`` times with errors that were not transient."""
        if isinstance(error, TransientError):
            return Action.RETRY
        if batch_size > 1:
            return Action.ISOLATE
        if isinstance(error, PermanentError) or attempts >= self.attempts:
            return Action.DEAD_LETTER
        return Action.RETRY
