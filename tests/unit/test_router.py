"""Routing decisions without a network: each policy's choice, the prefix record, the load margin, tenant
salting, and ejected replicas staying out of the rotation."""

from __future__ import annotations

import pytest

from flashserve.api.chat import generation_request
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.backends.remote import RemoteBackend, Upstream
from flashserve.backends.router import PREFIX_BLOCK_CHARS, Replica, Router, prefix_hashes
from flashserve.generation import GenerationRequest, RequestContext


def replica(name: str) -> Replica:
    return Replica(name, RemoteBackend(Upstream(f"http://{name}/v1", "m")))


def request(system: str, user: str = "hi") -> GenerationRequest:
    return generation_request(ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": user}]}))


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


# -- the load count cannot leak: every way out of Router.open before the hand-over gives it back ----------
class FakeBackend:
    """A Backend whose `open` runs the test's coroutine."""

    name = "fake"
    system_fingerprint = "fp_fake"

    def __init__(self, opener: object) -> None:
        self.opener = opener

    async def open(self, request: object, ctx: object) -> object:
        return await self.opener()  # type: ignore[operator]

    load = 0

    async def abort_all(self) -> int:
        return 0

    def stats(self) -> dict[str, object]:
        return {}

    async def inspect(self) -> dict[str, object]:
        return {}

    async def close(self) -> None:
        pass


class FakeGeneration:
    def __init__(self) -> None:
        from flashserve.generation import Usage

        self.usage = Usage()
        self.aborted = False

    def __aiter__(self) -> object:
        return self._deltas()

    async def _deltas(self) -> object:
        return
        yield

    async def abort(self) -> None:
        self.aborted = True


def fake_replica(name: str, opener: object) -> Replica:
    return Replica(name, FakeBackend(opener))  # type: ignore[arg-type]


def test_a_transport_error_while_opening_gives_the_slot_back() -> None:
    import asyncio

    import httpx

    async def fails() -> object:
        raise httpx.ReadError("connection reset while reading the refusal")

    r = fake_replica("a", fails)
    router = Router([r], "least_load")
    with pytest.raises(httpx.ReadError):
        asyncio.run(router.open(request("s"), RequestContext("r")))
    assert r.active == 0


def test_cancellation_while_opening_gives_the_slot_back() -> None:
    import asyncio

    async def hangs() -> object:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    r = fake_replica("a", hangs)
    router = Router([r], "least_load")

    async def main() -> None:
        task = asyncio.create_task(router.open(request("s"), RequestContext("r")))
        await asyncio.sleep(0.01)
        assert r.active == 1  # counted while the open is under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert r.active == 0


def test_failover_counts_only_the_replica_that_serves_until_the_generation_ends() -> None:
    import asyncio

    from flashserve.errors import server_error

    async def refuses() -> object:
        raise server_error(502, "upstream down", "upstream_error")

    async def serves() -> object:
        return FakeGeneration()

    bad, good = fake_replica("bad", refuses), fake_replica("good", serves)
    router = Router([bad, good], "round_robin")

    async def main() -> None:
        routed = await router.open(request("s"), RequestContext("r"))
        assert (bad.active, good.active, bad.healthy) == (0, 1, False)
        async for _ in routed:
            pass
        assert good.active == 0
        await routed.abort()  # idempotent: never counts below zero
        assert good.active == 0

    asyncio.run(main())


def test_remote_open_closes_the_refusal_and_the_router_gives_the_slot_back() -> None:
    """An httpx error reading a refusal's body (RemoteBackend.open's `aread`) and a cancellation there."""
    import asyncio

    import httpx

    from flashserve.errors import FlashserveError

    closed: list[str] = []
    gate = asyncio.Event

    class Body(httpx.AsyncByteStream):
        def __init__(self, mode: str) -> None:
            self.mode = mode

        async def __aiter__(self) -> object:
            if self.mode == "hang":
                await gate().wait()
            raise httpx.ReadError("reset")
            yield b""

        async def aclose(self) -> None:
            closed.append(self.mode)

    def replica_for(mode: str) -> Replica:
        transport = httpx.MockTransport(lambda req: httpx.Response(500, stream=Body(mode)))
        backend = RemoteBackend(Upstream(f"http://{mode}/v1", "m", retries=0),
                                client=httpx.AsyncClient(transport=transport))
        return Replica(mode, backend)

    async def main() -> None:
        failing = replica_for("fail")
        with pytest.raises(FlashserveError) as err:
            await Router([failing], "least_load").open(request("s"), RequestContext("r"))
        assert err.value.code == "no_replica_available"  # its 502 ejected the only replica
        assert failing.active == 0 and not failing.healthy and "fail" in closed
        hanging = replica_for("hang")
        task = asyncio.create_task(Router([hanging], "least_load").open(request("s"), RequestContext("r")))
        await asyncio.sleep(0.05)
        assert hanging.active == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert hanging.active == 0 and "hang" in closed

    asyncio.run(main())
