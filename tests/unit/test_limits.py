"""Per-key limits with a controllable clock."""

from __future__ import annotations

import pytest

from flashserve.accounts.keys import KeyLimits
from flashserve.accounts.limits import RateLimited, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrency_limit_frees_on_release() -> None:
    limiter = RateLimiter(Clock())
    limits = KeyLimits(max_concurrent=2)
    a, _ = limiter.acquire("k", limits), limiter.acquire("k", limits)
    with pytest.raises(RateLimited):
        limiter.acquire("k", limits)
    a.release()
    a.release()  # idempotent: does not free a second slot
    limiter.acquire("k", limits)
    with pytest.raises(RateLimited):
        limiter.acquire("k", limits)


def test_requests_per_minute_with_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = KeyLimits(rpm=2)
    limiter.acquire("k", limits).release()
    clock.now += 10
    limiter.acquire("k", limits).release()
    with pytest.raises(RateLimited) as err:
        limiter.acquire("k", limits)
    assert err.value.retry_after == 50  # the first request leaves the window 60 s after it came
    clock.now += 50
    limiter.acquire("k", limits).release()


def test_tokens_per_minute_counts_what_requests_used() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = KeyLimits(tpm=100)
    limiter.acquire("k", limits).release(60)
    clock.now += 5
    limiter.acquire("k", limits).release(50)
    with pytest.raises(RateLimited) as err:
        limiter.acquire("k", limits)
    assert err.value.retry_after == 55
    clock.now += 56
    limiter.acquire("k", limits).release(10)


def test_keys_are_independent_and_unlimited_by_default() -> None:
    limiter = RateLimiter(Clock())
    for _ in range(1000):
        limiter.acquire("free", KeyLimits())
    limiter.acquire("other", KeyLimits(max_concurrent=1))
    with pytest.raises(RateLimited):
        limiter.acquire("other", KeyLimits(max_concurrent=1))


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        KeyLimits(rpm=0)
