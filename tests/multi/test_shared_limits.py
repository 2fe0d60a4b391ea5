"""Shared limits across two `flashserve serve` processes on one PostgreSQL and one Redis (issue 18 §1).

- a key with rpm 10, sent 30 requests alternating between the gateways: exactly 10 accepted;
- a key with max_concurrent 2: never more than 2 of its requests run upstream at once, whichever gateway;
- an account with max_concurrent 2 over two keys: the same, across keys and gateways;
- a gateway SIGKILLed while holding a slot: the slot frees after the lease TTL, not before, not never.

The requests go to tests/multi/slow_upstream.py (a model in the gateways' catalog), which counts how many of
a tag's requests it runs at once: the truth about concurrency, measured outside the gateways.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.multi.conftest import UPSTREAM_MODEL, Gateway

LEASE_TTL_S = 3.0


@dataclass
class Pair:
    a: Gateway
    b: Gateway
    upstream: str

    def stats(self, tag: str) -> dict[str, int]:
        return httpx.get(f"{self.upstream}/stats/{tag}", timeout=10).json()

    def new_account(self, **limits: int | None) -> str:
        admin = self.a.admin()
        r = admin.post("/admin/accounts", json={"name": f"multi-{uuid.uuid4().hex[:8]}", "balance_usd": "1"})
        assert r.status_code == 201, r.text
        account = r.json()["id"]
        if limits:
            r = self.b.admin().post(f"/admin/accounts/{account}/limits", json=limits)  # through the other one
            assert r.status_code == 200, r.text
        return str(account)

    def new_key(self, account: str, **limits: int) -> str:
        r = self.b.admin().post("/admin/keys", json={"account_id": account, **limits})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


@pytest.fixture(scope="module")
def pair(fresh_database: str, launch_gateway: Callable[..., Gateway], upstream_catalog: Path,
         slow_upstream: str, redis_url: str) -> Iterator[Pair]:
    env = {"FLASHSERVE_REDIS_URL": redis_url, "FLASHSERVE_REDIS_KEY_PREFIX": f"multi-{uuid.uuid4().hex[:8]}",
           "FLASHSERVE_REDIS_LEASE_TTL_S": str(LEASE_TTL_S), "FLASHSERVE_REDIS_FAILURE_MODE": "closed",
           "FLASHSERVE_CATALOG": str(upstream_catalog)}
    a = launch_gateway(fresh_database, env)  # one at a time: the first migrates the fresh database
    b = launch_gateway(fresh_database, env)
    yield Pair(a, b, slow_upstream)


def ask(gateway: Gateway, key: str, text: str) -> httpx.Response:
    return gateway.client(key).post("/v1/chat/completions", json={
        "model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8})


def until_admitted(gateway: Gateway, key: str, text: str, deadline_s: float = 60.0) -> httpx.Response:
    """Send until not refused by a limit (a client that retries its 429s)."""
    deadline = time.monotonic() + deadline_s
    while True:
        r = ask(gateway, key, text)
        if r.status_code != 429 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_rpm_10_holds_across_two_gateways(pair: Pair) -> None:
    key = pair.new_key(pair.new_account(), rpm=10)
    results = [ask(pair.a if i % 2 == 0 else pair.b, key, "hi tag=rpm") for i in range(30)]
    codes = [r.status_code for r in results]
    assert codes.count(200) == 10 and codes.count(429) == 20, codes
    refused = [r for r in results if r.status_code == 429]
    assert all("10 requests per minute" in r.json()["error"]["message"] for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert {r.status_code for r in results[:10]} == {200}  # the first ten, sent one after another, all ran


def _run_concurrently(pair: Pair, keys: list[str], tag: str, requests: int = 8) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        gateway = pair.a if i % 2 == 0 else pair.b
        return until_admitted(gateway, keys[i % len(keys)], f"sleep 0.6 tag={tag}")

    with ThreadPoolExecutor(max_workers=requests) as pool:
        return list(pool.map(one, range(requests)))


def test_key_concurrency_2_holds_across_two_gateways(pair: Pair) -> None:
    key = pair.new_key(pair.new_account(), max_concurrent=2)
    results = _run_concurrently(pair, [key], "keyconc")
    assert [r.status_code for r in results] == [200] * 8
    stats = pair.stats("keyconc")
    assert stats["requests"] == 8 and stats["in_flight"] == 0
    assert stats["max_in_flight"] == 2, stats  # both slots used, never a third


def test_account_concurrency_holds_across_keys_and_gateways(pair: Pair) -> None:
    account = pair.new_account(max_concurrent=2)
    keys = [pair.new_key(account), pair.new_key(account)]
    results = _run_concurrently(pair, keys, "acctconc")
    assert [r.status_code for r in results] == [200] * 8
    stats = pair.stats("acctconc")
    assert stats["requests"] == 8 and stats["max_in_flight"] == 2, stats
    # Held: two running (one per key, one per gateway), a third through either gateway and key is refused.
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = [pool.submit(ask, pair.a, keys[0], "sleep 3 tag=accthold"),
                   pool.submit(ask, pair.b, keys[1], "sleep 3 tag=accthold")]
        deadline = time.monotonic() + 20
        while pair.stats("accthold")["in_flight"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = ask(pair.a, keys[1], "hi tag=accthold")
        assert refused.status_code == 429 and f"account {account}" in refused.json()["error"]["message"]
        assert [f.result().status_code for f in running] == [200, 200]


def test_a_killed_gateways_slot_frees_after_the_lease_ttl(pair: Pair) -> None:
    """Runs last: it kills gateway a."""
    key = pair.new_key(pair.new_account(), max_concurrent=1)
    holder = threading.Thread(target=lambda: _swallow(lambda: ask(pair.a, key, "sleep 60 tag=kill")), daemon=True)
    holder.start()
    deadline = time.monotonic() + 20
    while pair.stats("kill")["in_flight"] < 1:
        assert time.monotonic() < deadline, pair.a.log()
        time.sleep(0.05)
    assert ask(pair.b, key, "hi tag=kill2").status_code == 429  # a's request holds the key's one slot
    time.sleep(LEASE_TTL_S)  # renewals keep a live gateway's slot well past one TTL
    assert ask(pair.b, key, "hi tag=kill2").status_code == 429
    pair.a.kill()
    killed = time.monotonic()
    assert ask(pair.b, key, "hi tag=kill2").status_code == 429  # not freed at once: nobody released it
    while True:
        r = ask(pair.b, key, "hi tag=kill2")
        if r.status_code == 200:
            break
        assert r.status_code == 429, r.text
        assert time.monotonic() - killed < LEASE_TTL_S + 3, "the dead gateway's slot never expired"
        time.sleep(0.1)
    freed_after = time.monotonic() - killed
    # Renewed every TTL/3, so the slot had between 2/3 TTL and one TTL left when its gateway died.
    assert LEASE_TTL_S * 2 / 3 - 0.5 <= freed_after <= LEASE_TTL_S + 3, freed_after
    holder.join(timeout=10)


def _swallow(call: Callable[[], object]) -> None:
    with contextlib.suppress(httpx.HTTPError):  # its gateway was killed under it
        call()
