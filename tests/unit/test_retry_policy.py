"""RetryPolicy: backoff bounds for both jitter kinds, and the one decision
(retry / isolate / dead-letter) the runner follows after a failure. Also the
dead letter's fit to the broker's size limit, which needs no broker."""

from __future__ import annotations

import hashlib

import pytest

from domain.errors import DocumentError, InvalidEvent, PermanentError, TransientError
from infra.kafka import headers as h
from infra.kafka.dead_letters import DeadLetter, dead_letter, fit
from infra.kafka.retry import Action, RetryPolicy


def test_equal_jitter_waits_between_half_and_all_of_the_capped_exponential() -> None:
    p = RetryPolicy(attempts=3, base=0.2, cap=5.0, jitter="equal")
    assert p.delay(1, rand=lambda: 0.0) == pytest.approx(0.2)
    assert p.delay(1, rand=lambda: 1.0) == pytest.approx(0.4)
    assert p.delay(3, rand=lambda: 0.0) == pytest.approx(0.8)
    assert p.delay(3, rand=lambda: 1.0) == pytest.approx(1.6)
    # capped, however many attempts
    assert p.delay(50, rand=lambda: 0.0) == pytest.approx(2.5)
    assert p.delay(10_000, rand=lambda: 1.0) == pytest.approx(5.0)


def test_full_jitter_may_wait_nothing_and_never_more_than_the_cap() -> None:
    p = RetryPolicy(base=1.0, cap=4.0, jitter="full")
    assert p.delay(2, rand=lambda: 0.0) == 0.0
    assert p.delay(2, rand=lambda: 0.5) == pytest.approx(2.0)
    assert p.delay(9, rand=lambda: 1.0) == pytest.approx(4.0)


def test_real_random_delays_stay_in_bounds_and_grow() -> None:
    p = RetryPolicy(base=0.1, cap=3.0)
    for attempt in range(1, 12):
        ceiling = min(3.0, 0.1 * 2**attempt)
        for _ in range(50):
            assert ceiling / 2 <= p.delay(attempt) <= ceiling


def test_invalid_policies_are_refused() -> None:
    for bad in ({"attempts": 0}, {"base": 0.0}, {"cap": -1.0}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("attempts", [0, 1, 6, 100])
def test_transient_errors_retry_the_same_batch_forever(batch: int, attempts: int) -> None:
    p = RetryPolicy(attempts=6)
    assert p.decide(TransientError("db restarting"), batch, attempts) is Action.RETRY


@pytest.mark.parametrize(
    "error", [ValueError("bug"), PermanentError("bad"), DocumentError("encrypted PDF")]
)
def test_any_other_error_in_a_batch_isolates_its_events(error: Exception) -> None:
    assert RetryPolicy().decide(error, 2, 1) is Action.ISOLATE


def test_an_unexpected_error_on_one_event_is_retried_up_to_the_bound() -> None:
    p = RetryPolicy(attempts=3)
    assert [p.decide(KeyError("x"), 1, n) for n in (1, 2, 3, 4)] == [
        Action.RETRY,
        Action.RETRY,
        Action.DEAD_LETTER,
        Action.DEAD_LETTER,
    ]


@pytest.mark.parametrize("error", [PermanentError("no"), InvalidEvent("bad json")])
def test_a_permanent_error_on_one_event_is_dead_lettered_at_once(error: Exception) -> None:
    assert RetryPolicy(attempts=6).decide(error, 1, 1) is Action.DEAD_LETTER


# --- dead letters always fit ------------------------------------------------------------


def _letter(value: bytes | None, key: bytes | None = b"doc-1") -> DeadLetter:
    return dead_letter(
        "parse",
        topic="kbstream.lifecycle",
        partition=2,
        offset=41,
        key=key,
        value=value,
        error=InvalidEvent("x" * 5000),
        attempts=1,
    )


def test_a_letter_that_fits_is_left_alone() -> None:
    letter = _letter(b"{}" * 100)
    assert fit(letter, 100_000) is letter
    assert not letter.truncated
    names = [k for k, _ in letter.headers]
    assert names == list(h.DEAD_LETTER_HEADERS)
    assert len(h.as_dict(letter.headers)[h.ERROR]) == 2000, "the reason is capped"


def test_an_oversized_body_is_cut_to_fit_with_size_and_digest_recorded() -> None:
    body = bytes(range(256)) * 4_000  # 1,024,000 bytes
    fitted = fit(_letter(body), 900_000)
    assert fitted.truncated
    assert fitted.size <= 900_000
    assert fitted.size > 890_000, "cut no more than needed"
    assert body.startswith(fitted.value or b"")
    got = h.as_dict(fitted.headers)
    assert got[h.ORIGINAL_SIZE] == str(len(body))
    assert got[h.ORIGINAL_SHA256] == hashlib.sha256(body).hexdigest()
    assert got[h.ERROR].startswith("InvalidEvent"), "the reason is kept"
    assert got[h.ORIGINAL_OFFSET] == "41" and got[h.STAGE] == "parse"
    assert fitted.key == b"doc-1"


def test_with_no_room_at_all_the_body_goes_and_an_outsized_key_is_cut() -> None:
    fitted = fit(_letter(b"v" * 10_000, key=b"k" * 50_000), 0)
    assert fitted.value == b""
    assert fitted.key == b"k" * 1024
    assert h.as_dict(fitted.headers)[h.ORIGINAL_SIZE] == "10000"
