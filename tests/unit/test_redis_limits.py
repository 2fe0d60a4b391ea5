"""The shared limiter's Lua scripts on a real `redis-server` (tests/redis_server.py): admission, sliding
windows, concurrency leases that expire when nobody renews them, atomicity across two clients, and what
happens when Redis cannot be reached (fail closed: refused; fail open: this process's limits, a warning
without the password)."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from flashserve.accounts.keys import KeyLimits
from flashserve.accounts.limits import LimiterUnavailable, RateLimited, Scope
from flashserve.accounts.redis_limits import RedisLease, RedisLimiter, redacted
from tests.redis_server import _free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def prefix() -> str:
    return "test-" + uuid.uuid4().hex[:12]  # every test its own keys, on one shared server


@pytest.fixture
async def limiter(redis_url: str, prefix: str) -> AsyncIterator[RedisLimiter]:
    lim = RedisLimiter(redis_url, prefix=prefix, window_s=1.0, lease_ttl_s=0.6, failure_mode="closed")
    yield lim
    await lim.close()


def key(limits: KeyLimits, name: str = "k") -> list[Scope]:
    return [Scope("key", name, limits)]


async def test_concurrency_slots_free_on_release(limiter: RedisLimiter) -> None:
    scopes = key(KeyLimits(max_concurrent=2))
    a = await limiter.acquire(scopes)
    b = await limiter.acquire(scopes)
    with pytest.raises(RateLimited) as err:
        await limiter.acquire(scopes)
    assert "key k" in str(err.value) and "limit 2" in str(err.value) and err.value.retry_after == 1
    await a.release()
    await a.release()  # idempotent: frees one slot, not two
    c = await limiter.acquire(scopes)
    with pytest.raises(RateLimited):
        await limiter.acquire(scopes)
    await b.release()
    await c.release()


async def test_requests_per_window_slide_with_retry_after(limiter: RedisLimiter) -> None:
    scopes = key(KeyLimits(rpm=2))
    await (await limiter.acquire(scopes)).release()
    await (await limiter.acquire(scopes)).release()
    with pytest.raises(RateLimited) as err:
        await limiter.acquire(scopes)
    assert "2 requests per minute" in str(err.value) and err.value.retry_after == 1  # the 1 s test window
    await asyncio.sleep(1.05)
    await (await limiter.acquire(scopes)).release()


async def test_tokens_count_when_requests_end(limiter: RedisLimiter) -> None:
    scopes = key(KeyLimits(tpm=100))
    await (await limiter.acquire(scopes)).release(60)
    running = await limiter.acquire(scopes)  # 60 < 100: admitted
    await running.release(50)
    with pytest.raises(RateLimited) as err:
        await limiter.acquire(scopes)
    assert "100 tokens per minute" in str(err.value)
    await asyncio.sleep(1.05)
    await (await limiter.acquire(scopes)).release()


async def test_a_refusal_counts_in_no_scope(limiter: RedisLimiter) -> None:
    account = Scope("account", "a", KeyLimits(max_concurrent=1))
    both = [Scope("key", "k", KeyLimits(rpm=1)), account]
    full = await limiter.acquire([account])
    with pytest.raises(RateLimited) as err:
        await limiter.acquire(both)
    assert "account a" in str(err.value)
    await full.release()
    await (await limiter.acquire(both)).release()  # the refused try did not use the key's one request


async def test_a_lease_nobody_renews_expires_after_its_ttl(limiter: RedisLimiter) -> None:
    scopes = key(KeyLimits(max_concurrent=1))
    held = await limiter.acquire(scopes)
    await asyncio.sleep(1.5)  # 2.5 TTLs: renewals keep it
    with pytest.raises(RateLimited):
        await limiter.acquire(scopes)
    assert isinstance(held, RedisLease) and held._renewer is not None
    held._renewer.cancel()  # what a killed gateway does: nothing more
    with pytest.raises(RateLimited):
        await limiter.acquire(scopes)
    await asyncio.sleep(0.7)
    await (await limiter.acquire(scopes)).release()


async def test_two_clients_share_one_count_atomically(redis_url: str, prefix: str) -> None:
    """Two limiters (as two gateways would hold) race 40 admissions for an RPM of 10: exactly 10 pass."""
    one = RedisLimiter(redis_url, prefix=prefix, failure_mode="closed")
    two = RedisLimiter(redis_url, prefix=prefix, failure_mode="closed")
    scopes = key(KeyLimits(rpm=10, max_concurrent=25))

    async def attempt(lim: RedisLimiter) -> bool:
        try:
            await lim.acquire(scopes)
        except RateLimited:
            return False
        return True

    try:
        results = await asyncio.gather(*(attempt(one if i % 2 else two) for i in range(40)))
        assert sum(results) == 10
    finally:
        await one.close()
        await two.close()


async def test_keys_carry_an_expiry(limiter: RedisLimiter, redis_url: str, prefix: str) -> None:
    lease = await limiter.acquire(key(KeyLimits(max_concurrent=3, rpm=5, tpm=500)))
    await lease.release(42)
    client = aioredis.Redis.from_url(redis_url)
    try:
        names = [name async for name in client.scan_iter(match=f"{prefix}:*")]
        assert names
        for name in names:
            assert 0 < await client.pttl(name) <= 1000
    finally:
        await client.aclose()


async def test_unreachable_redis_fails_closed() -> None:
    lim = RedisLimiter(f"redis://127.0.0.1:{_free_port()}/0", failure_mode="closed", timeout_s=0.5)
    try:
        with pytest.raises(LimiterUnavailable):
            await lim.acquire(key(KeyLimits(rpm=5)))
        await (await lim.acquire([])).release()  # nothing limited: Redis is not asked at all
    finally:
        await lim.close()


async def test_unreachable_redis_fails_open_to_this_process_limits(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://flashserve:hunter2-secret@127.0.0.1:{_free_port()}/0"
    lim = RedisLimiter(url, failure_mode="open", timeout_s=0.5)
    scopes = key(KeyLimits(max_concurrent=1))
    try:
        with caplog.at_level(logging.WARNING, logger="flashserve.accounts.redis_limits"):
            lease = await lim.acquire(scopes)
            with pytest.raises(RateLimited):  # still held to this process's own counters
                await lim.acquire(scopes)
            await lease.release(10)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings and "unreachable" in warnings[0] and "open" in warnings[0]
        assert not any("hunter2" in w or "flashserve:" in w for w in warnings)
    finally:
        await lim.close()
    assert redacted(url) == "redis://127.0.0.1:" + url.rsplit(":", 1)[1].split("/")[0]


async def test_release_never_waits_on_a_renewal_in_flight(redis_url: str, prefix: str) -> None:
    """Leases renewed every 10 ms, released at random moments (often mid-renewal): every release returns
    promptly. (A release that awaited its cancelled renewer could hang when redis-py turned the cancel into a
    timeout.)"""
    lim = RedisLimiter(redis_url, prefix=prefix, lease_ttl_s=0.03, failure_mode="closed")

    async def one(i: int) -> None:
        lease = await lim.acquire(key(KeyLimits(max_concurrent=1000), f"k{i % 3}"))
        await asyncio.sleep(random.random() * 0.1)
        await asyncio.wait_for(lease.release(5), 5)

    try:
        for _ in range(5):
            await asyncio.gather(*(one(i) for i in range(40)))
    finally:
        await lim.close()
