"""The remote embedding service's rate limiter, on a simulated clock: what it lets
through in any 60-second window, and the pause a 429's Retry-After puts on it."""

from __future__ import annotations

import math
import random
import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from infra.rate_limit import RateLimiter, TokenBucket, parse_retry_after


class SimulatedClock:
    """time.monotonic and time.sleep for one thread: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def most_in_any_window(times: list[float], weights: list[int], window: float = 60.0) -> int:
    most = 0
    for i, start in enumerate(times):
        most = max(
            most, sum(w for t, w in zip(times[i:], weights[i:], strict=True) if t < start + window)
        )
    return most


@pytest.mark.parametrize("rpm", [1, 7, 60, 120, 3000])
def test_never_more_than_rpm_requests_in_any_minute(rpm: int) -> None:
    clock = SimulatedClock()
    limiter = RateLimiter(rpm, 0, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(3 * rpm + 5):
        limiter.acquire(10)
        times.append(clock.now)
    # rpm == 1 would never refill with a burst of one; it lets 2 through instead
    assert most_in_any_window(times, [1] * len(times)) <= max(rpm, 2)
    # and a rate, not a stop: it loses at most one second's worth a minute
    assert times[-1] - times[0] <= len(times) * 60 / max(rpm - max(1, rpm / 60), 1)


def test_tokens_per_minute_with_requests_larger_than_a_second_of_budget() -> None:
    clock = SimulatedClock()
    tpm = 12_000  # 200 a second: most requests below borrow
    limiter = RateLimiter(0, tpm, clock=clock, sleep=clock.sleep)
    rng = random.Random(3)
    weights = [rng.randint(1, 900) for _ in range(300)]
    times = []
    for w in weights:
        limiter.acquire(w)
        times.append(clock.now)
    burst = tpm / 60
    assert most_in_any_window(times, weights) <= tpm + max(weights) - burst
    # a request larger than the whole minute still goes, alone
    limiter.acquire(50_000)


def test_both_limits_hold_together() -> None:
    clock = SimulatedClock()
    limiter = RateLimiter(600, 6000, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(400):
        limiter.acquire(20)  # tokens allow 300 a minute, requests 600: tokens bind
        times.append(clock.now)
    assert most_in_any_window(times, [20] * 400) <= 6000
    assert most_in_any_window(times, [1] * 400) <= 600


def test_a_pause_holds_every_request_until_it_ends() -> None:
    clock = SimulatedClock()
    limiter = RateLimiter(6000, 0, clock=clock, sleep=clock.sleep)
    limiter.acquire(1)
    limiter.pause_for(5.0)
    limiter.pause_for(2.0)  # a shorter pause does not cut the longer one
    start = clock.now
    waited = limiter.acquire(1)
    assert clock.now >= start + 5.0
    assert waited >= 5.0
    assert limiter.paused_for == 0.0


def test_threads_share_the_budget() -> None:
    """Eight threads at once, the clock standing still (nothing refills): every
    acquire is taken from the one bucket exactly once."""
    clock = SimulatedClock()
    limiter = RateLimiter(60_000, 0, clock=clock, sleep=clock.sleep)  # a burst of 1,000
    assert limiter.requests is not None
    level_before = limiter.requests.level

    def work() -> None:
        for _ in range(50):
            limiter.acquire(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bucket: TokenBucket = limiter.requests
    assert bucket.level == pytest.approx(level_before - 400)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        ("0.2", 0.2),
        (" 12 ", 12.0),
        ("-4", 0.0),
        ("inf", math.inf),
        ("+Infinity", math.inf),
        ("-inf", 0.0),
        ("nan", None),
        ("1e400", math.inf),
        ("Mon, 99 Foo 99999 99:99:99 GMT", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_retry_after_http_date() -> None:
    now = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now) == pytest.approx(30.0)
    assert parse_retry_after(earlier, now=now) == 0.0


@pytest.mark.parametrize("seconds", [3600.0, math.inf, -5.0, math.nan])
def test_a_pause_is_capped_and_finite(seconds: float) -> None:
    """However long a server asks (an hour, inf), no caller waits past max_pause."""
    now = [100.0]
    slept: list[float] = []
    limiter = RateLimiter(0, 0, clock=lambda: now[0], sleep=slept.append, max_pause=30.0)
    applied = limiter.pause_for(seconds)
    assert 0.0 <= applied <= 30.0 and limiter.paused_for == applied

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter.sleep = sleep
    assert limiter.acquire(1) == applied
    assert all(s <= 30.0 for s in slept)


def test_the_cap_must_be_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        RateLimiter(0, 0, max_pause=math.inf)
