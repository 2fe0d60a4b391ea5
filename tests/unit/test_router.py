"""Routing decisions without a network: each policy's choice, the prefix record, the load margin, tenant
salting, and ejected replicas staying out of the rotation."""

from __future__ import annotations

import pytest

from flashserve.api.schemas import ChatCompletionRequest
from flashserve.backends.remote import RemoteBackend, Upstream
from flashserve.backends.router import PREFIX_BLOCK_CHARS, Replica, Router, prefix_hashes


def replica(name: str) -> Replica:
    return Replica(name, RemoteBackend(Upstream(f"http://{name}/v1", "m")))


def request(system: str, user: str = "hi") -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": user}]})


SYSTEM = "x" * (4 * PREFIX_BLOCK_CHARS)


def test_prefix_hashes_share_exactly_the_common_blocks_and_are_salted() -> None:
    a = prefix_hashes(request(SYSTEM, "first"), "tenant-1")
    b = prefix_hashes(request(SYSTEM, "second, quite different"), "tenant-1")
    assert len(a) >= 4 and a[:4] == b[:4]
    assert set(prefix_hashes(request(SYSTEM, "first"), "tenant-2")).isdisjoint(a)


def test_policies_choose_as_documented() -> None:
    r1, r2, r3 = replica("a"), replica("b"), replica("c")
    hashes = prefix_hashes(request(SYSTEM), "t")
    rr = Router([r1, r2, r3], "round_robin")
    assert [rr.pick(hashes).name for _ in range(4)] == ["a", "b", "c", "a"]  # type: ignore[union-attr]
    r1.active, r2.active, r3.active = 3, 1, 2
    assert Router([r1, r2, r3], "least_load").pick(hashes) is r2
    pa = Router([r1, r2, r3], "prefix_aware", margin=4)
    r3.remember(hashes, 100)
    assert pa.pick(hashes) is r3  # the prefix's holder, although not the least loaded
    r3.active = 6  # now more than margin beyond the least loaded (1)
    assert pa.pick(hashes) is r2
    assert pa.pick(prefix_hashes(request("y" * 2000), "t")) is r2  # no holder: the least loaded
    r2.healthy = False
    assert pa.pick(hashes) in (r1, r3) and Router([r2], "least_load").pick(hashes) is None


def test_the_prefix_record_is_bounded() -> None:
    r = replica("a")
    r.remember(prefix_hashes(request(SYSTEM), "t"), limit=2)
    assert len(r.prefixes) == 2


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        Router([replica("a")], "random")


def test_health_checks_eject_then_re_admit(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import httpx

    answers = iter([503, 200])  # down at the first check, back at the second

    async def fake_get(self: httpx.AsyncClient, url: str, **kw: object) -> httpx.Response:
        return httpx.Response(next(answers, 200))

    monkeypatch.setattr(httpx.AsyncClient, "get", fake_get)
    r = replica("a")
    r.health_url = "http://a/health"
    router = Router([r], "least_load", health_interval_s=0.01)
    seen: list[bool] = []

    async def watch() -> None:
        task = asyncio.create_task(router._check_health())
        for _ in range(200):
            await asyncio.sleep(0.005)
            if not seen or seen[-1] != r.healthy:
                seen.append(r.healthy)
            if seen[-2:] == [False, True]:
                break
        task.cancel()

    asyncio.run(watch())
    assert seen[-2:] == [False, True], seen
