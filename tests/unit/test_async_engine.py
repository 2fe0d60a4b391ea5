"""The engine thread seen from asyncio: streams, awaited aborts, failures that end requests."""

from __future__ import annotations

import asyncio

import pytest

from flashserve.engine.async_engine import AsyncEngine, EngineDeadError
from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.request import FinishReason, SamplingParams
from tests.unit.fake_model import VOCAB, CountingModel, expected_next


def make() -> AsyncEngine:
    config = EngineConfig(max_model_len=256, num_kv_blocks=64, block_size=4)
    engine = AsyncEngine(LLMEngine(CountingModel(), config, VOCAB))
    engine.start()
    return engine


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], n: int) -> list[int]:
    stream = await engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=n))
    return [t async for out in stream for t in out.new_token_ids]


def test_concurrent_streams_complete() -> None:
    engine = make()

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(collect(engine, f"r{i}", [i + 1] * 5, 8) for i in range(8)))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for i, tokens in enumerate(results):
        ctx = [i + 1] * 5
        for t in tokens:
            assert t == expected_next(ctx)
            ctx.append(t)


def test_abort_is_awaited_and_frees_blocks() -> None:
    engine = make()

    async def main() -> None:
        stream = await engine.add_request("a", list(range(20)), SamplingParams(temperature=0, max_tokens=200))
        async for _ in stream:
            break
        await stream.abort()
        assert engine.engine.kv.num_free_blocks == engine.engine.kv.num_blocks
        await stream.abort()  # idempotent
        assert engine.num_active == 0

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving() -> None:
    engine = make()
    model = engine.engine.model
    original = model.forward
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    model.forward = flaky  # type: ignore[method-assign]

    async def main() -> list[int]:
        with pytest.raises(EngineDeadError):
            await collect(engine, "bad", [1, 2, 3], 4)
        return await collect(engine, "good", [1, 2, 3], 4)

    try:
        assert len(asyncio.run(main())) == 4
    finally:
        engine.shutdown()
    assert engine.engine.kv.num_free_blocks == engine.engine.kv.num_blocks


def test_requests_after_shutdown_are_refused_and_in_flight_ones_end() -> None:
    engine = make()

    async def main() -> None:
        stream = await engine.add_request("a", [1, 2], SamplingParams(temperature=0, max_tokens=10_000,
                                                                      ignore_eos=True))
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for out in stream:
                assert out.finish_reason is not FinishReason.LENGTH
        with pytest.raises(EngineDeadError):
            await engine.add_request("b", [1], SamplingParams())

    asyncio.run(main())
