"""Client-side rate limits of a remote embedding service: requests per minute and
tokens per minute, shared by every thread of the process, and a pause that a
``429 Retry-After`` puts on all of them.

A small class rather than pyrate-limiter or limits: both keep a sliding-window log
with one entry per unit of weight (a 1,000,000 tokens-per-minute limit is a list of
up to a million timestamps) behind a background leak thread, and neither can pause
every caller until a server-given instant. Here each limit is one token bucket (two
floats) under one lock.
"""

from __future__ import annotations

import email.utils
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

WINDOW = 60.0  # seconds: the limits are per minute


class TokenBucket:
    """``per_minute`` units per 60 seconds, as a token bucket that holds at most one
    second's worth (``burst``, at least 1) and refills at ``per_minute - burst`` per
    minute. Whatever it held at the start of any 60-second window plus what flowed in
    during it is at most ``per_minute``, so no window ever sees more taken.

    A weight above ``burst`` (a request with more tokens than one second's budget)
    waits for a full bucket and then borrows: the bucket goes negative and later
    callers wait until it has refilled. That window may exceed ``per_minute`` by the
    weight's excess over ``burst``, once."""

    def __init__(self, per_minute: int, now: float) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self.burst = max(1.0, per_minute / WINDOW)
        # per_minute == 1 would never refill: allow one more per minute instead
        self.rate = max(per_minute - self.burst, 1.0) / WINDOW  # units per second
        self.level = self.burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def delay(self, weight: float, now: float) -> float:
        """Seconds until ``weight`` can be taken; 0 if it can be now."""
        self._refill(now)
        need = min(weight, self.burst)
        if self.level >= need - 1e-9:
            return 0.0
        return (need - self.level) / self.rate

    def take(self, weight: float, now: float) -> None:
        self._refill(now)
        self.level -= weight


class RateLimiter:
    """Blocks each request until it fits both buckets and no pause is in force.

    Every request, retries included, takes one request and its estimated tokens
    before it is sent, so the number of threads in flight changes how many requests
    wait, never how many start per minute."""

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        max_pause: float = 60.0,
    ) -> None:
        if not 0 <= max_pause < math.inf:
            raise ValueError("max_pause must be a finite number of seconds")
        self.max_pause = max_pause
        self.clock = clock
        self.sleep = sleep
        now = clock()
        self.requests = TokenBucket(requests_per_minute, now) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute, now) if tokens_per_minute else None
        self._resume_at = now
        self._lock = threading.Lock()

    def acquire(self, tokens: int) -> float:
        """Take one request and ``tokens`` tokens, waiting as long as it takes;
        returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self.clock()
                wait = self._resume_at - now
                if self.requests is not None:
                    wait = max(wait, self.requests.delay(1, now))
                if self.tokens is not None:
                    wait = max(wait, self.tokens.delay(tokens, now))
                if wait <= 0:
                    if self.requests is not None:
                        self.requests.take(1, now)
                    if self.tokens is not None:
                        self.tokens.take(tokens, now)
                    return waited
            # sleep outside the lock; another thread may take the units first,
            # or a 429 may extend the pause: both are seen on the next turn
            self.sleep(wait)
            waited += wait

    def pause_for(self, seconds: float) -> float:
        """No request starts for ``seconds`` (a server's Retry-After), at most
        ``max_pause``: one server's hour-long (or infinite) Retry-After must not hold
        every later call of the process that long. A longer pause already in force
        stays. Returns the pause applied."""
        seconds = min(max(seconds, 0.0), self.max_pause) if seconds == seconds else 0.0
        with self._lock:
            self._resume_at = max(self._resume_at, self.clock() + seconds)
        return seconds

    @property
    def paused_for(self) -> float:
        with self._lock:
            return max(0.0, self._resume_at - self.clock())


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds (fractions accepted, as some
    servers send them) or an HTTP date; a past date or a negative number is 0, "inf"
    is ``math.inf`` (longer than any cap: the caller fails the request rather than
    wait). None if absent or unreadable ("nan" included)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)
