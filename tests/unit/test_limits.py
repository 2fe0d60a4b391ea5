"""The in-memory limiter (one process) with a controllable clock: per-key, per-account and per-end-user
scopes, all-or-nothing admission, the limit named in the refusal."""

from __future__ import annotations

import pytest

from flashserve.accounts.keys import KeyLimits
from flashserve.accounts.limits import MemoryLimiter, RateLimited, Scope, end_user_scope_id, scopes_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(limits: KeyLimits, name: str = "k") -> list[Scope]:
    return [Scope("key", name, limits)]


def test_concurrency_limit_frees_on_release() -> None:
    limiter = MemoryLimiter(Clock())
    limits = key(KeyLimits(max_concurrent=2))
    a, _ = limiter.acquire_now(limits), limiter.acquire_now(limits)
    with pytest.raises(RateLimited) as err:
        limiter.acquire_now(limits)
    assert "key k" in str(err.value) and "limit 2" in str(err.value)
    a.release_now()
    a.release_now()  # idempotent: does not free a second slot
    limiter.acquire_now(limits)
    with pytest.raises(RateLimited):
        limiter.acquire_now(limits)


def test_requests_per_minute_with_retry_after() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)
    limits = key(KeyLimits(rpm=2))
    limiter.acquire_now(limits).release_now()
    clock.now += 10
    limiter.acquire_now(limits).release_now()
    with pytest.raises(RateLimited) as err:
        limiter.acquire_now(limits)
    assert err.value.retry_after == 50  # the first request leaves the window 60 s after it came
    assert "2 requests per minute" in str(err.value)
    clock.now += 50
    limiter.acquire_now(limits).release_now()


def test_tokens_per_minute_counts_what_requests_used() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)
    limits = key(KeyLimits(tpm=100))
    limiter.acquire_now(limits).release_now(60)
    clock.now += 5
    limiter.acquire_now(limits).release_now(50)
    with pytest.raises(RateLimited) as err:
        limiter.acquire_now(limits)
    assert err.value.retry_after == 55 and "100 tokens per minute" in str(err.value)
    clock.now += 56
    limiter.acquire_now(limits).release_now(10)


def test_keys_are_independent_and_unlimited_scopes_are_not_counted() -> None:
    limiter = MemoryLimiter(Clock())
    assert scopes_of("free", KeyLimits(), "acct", KeyLimits(), "alice", KeyLimits()) == []
    for _ in range(1000):
        limiter.acquire_now([])
    limiter.acquire_now(key(KeyLimits(max_concurrent=1), "other"))
    with pytest.raises(RateLimited):
        limiter.acquire_now(key(KeyLimits(max_concurrent=1), "other"))


def test_account_limit_holds_across_its_keys() -> None:
    limiter = MemoryLimiter(Clock())
    account = KeyLimits(max_concurrent=2)
    first = limiter.acquire_now(scopes_of("key_a", KeyLimits(), "acct_1", account, None, KeyLimits()))
    limiter.acquire_now(scopes_of("key_b", KeyLimits(), "acct_1", account, None, KeyLimits()))
    with pytest.raises(RateLimited) as err:
        limiter.acquire_now(scopes_of("key_c", KeyLimits(), "acct_1", account, None, KeyLimits()))
    assert "account acct_1" in str(err.value)
    limiter.acquire_now(scopes_of("key_d", KeyLimits(), "acct_2", account, None, KeyLimits()))  # another account
    first.release_now()
    limiter.acquire_now(scopes_of("key_c", KeyLimits(), "acct_1", account, None, KeyLimits()))


def test_end_user_sub_limit_is_per_user_and_per_account() -> None:
    limiter = MemoryLimiter(Clock())
    users = KeyLimits(rpm=1)

    def scopes(account: str, user: str | None) -> list[Scope]:
        return scopes_of("key_a", KeyLimits(), account, KeyLimits(), user, users)

    limiter.acquire_now(scopes("acct_1", "alice")).release_now()
    with pytest.raises(RateLimited) as err:
        limiter.acquire_now(scopes("acct_1", "alice"))
    assert "end user" in str(err.value) and "alice" not in str(err.value)
    limiter.acquire_now(scopes("acct_1", "bob")).release_now()  # another user
    limiter.acquire_now(scopes("acct_2", "alice")).release_now()  # the same name in another account
    limiter.acquire_now(scopes("acct_1", None)).release_now()  # no user: no end-user limit
    assert end_user_scope_id("acct_1", "alice") != end_user_scope_id("acct_2", "alice")
    assert "alice" not in end_user_scope_id("acct_1", "alice")


def test_a_refusal_counts_in_no_scope() -> None:
    """All or nothing: the key has room, the account has not; the key's counters stay untouched."""
    limiter = MemoryLimiter(Clock())
    full = limiter.acquire_now([Scope("account", "a", KeyLimits(max_concurrent=1))])
    both = [Scope("key", "k", KeyLimits(rpm=1)), Scope("account", "a", KeyLimits(max_concurrent=1))]
    with pytest.raises(RateLimited):
        limiter.acquire_now(both)
    full.release_now()
    limiter.acquire_now(both)  # the refused try did not use the key's one request


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        KeyLimits(rpm=0)
