"""The graceful drain SIGTERM starts (`api/app.py: drain`), in-process and deterministic: new requests get
503 `shutting_down` (health still answers, "draining"); requests in flight finish within the drain time;
past it they are aborted (the local engine's, a scripted backend's, and a remote upstream's streams), the
client's stream ends with the `request_aborted` error event, and the usage row is written.

The remote case replaces the e2e test removed as flaky (a8c2f86): here the upstream holds its stream open
until the drain time is up, so the abort always lands mid-stream.

Moved here from tests/e2e/test_overload_and_shutdown.py (SIGTERM drains in-flight work; past the drain time
aborts and records); the real SIGTERM of a real process is the smoke test in tests/e2e/test_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.api.conftest import Api
from tests.api.test_billing import body, first_content

pytestmark = pytest.mark.anyio


async def test_new_requests_get_503_while_in_flight_work_finishes(api: Api) -> None:
    async with api.client.stream("POST", "/v1/chat/completions",
                                 json=body("scripted", "a @hold b", stream=True)) as r:
        lines = r.aiter_lines()
        await first_content(lines)
        draining = asyncio.create_task(api.drain(10.0))
        await asyncio.sleep(0.05)
        refused = await api.client.post("/v1/chat/completions", json=body("scripted", "new"))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "shutting_down"
        assert "x-request-id" in refused.headers or refused.json()["error"]["type"] == "server_error"
        health = await api.client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "draining"
        assert not draining.done()  # it waits for the stream
        api.scripted.release()
        rest = [line async for line in lines if line]
    await asyncio.wait_for(draining, 5)
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
    [row] = await api.records()
    assert row["status"] == "ok" and row["completion_tokens"] == 2
    assert not api.scripted.generations[0].aborted


async def read_to_the_end(lines: Any) -> list[str]:
    """The rest of a stream; bounded, so a drain that never aborts fails instead of hanging."""

    async def rest() -> list[str]:
        return [line async for line in lines if line]

    return await asyncio.wait_for(rest(), 15)


def assert_aborted_in_band(rest: list[str]) -> None:
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["code"] == "request_aborted" and error["type"] == "server_error", error


async def test_past_the_drain_time_a_scripted_stream_is_aborted_and_recorded(api: Api) -> None:
    async with api.client.stream("POST", "/v1/chat/completions",
                                 json=body("scripted", "a @hold b", stream=True)) as r:
        lines = r.aiter_lines()
        await first_content(lines)
        await api.drain(0.2)  # returns once the aborted request has ended its response and its row
        rest = await read_to_the_end(lines)
    assert_aborted_in_band(rest)
    [row] = await api.records()
    assert row["status"] == "error" and row["completion_tokens"] == 1 and row["cost_pusd"] > 0
    assert api.scripted.generations[0].aborted


async def test_past_the_drain_time_the_engine_aborts_and_records(api: Api) -> None:
    api.model.delay_s = 0.01  # 400 tokens: 4 s, far past the drain time
    async with api.client.stream("POST", "/v1/chat/completions",
                                 json=body("fake-local", "hello", stream=True, max_tokens=400)) as r:
        lines = r.aiter_lines()
        await first_content(lines)
        await api.drain(0.2)
        rest = await read_to_the_end(lines)
    assert_aborted_in_band(rest)
    [row] = await api.records()
    assert row["status"] == "error" and 0 < row["completion_tokens"] < 400 and row["cost_pusd"] > 0
    assert api.local.num_active == 0


async def test_past_the_drain_time_a_non_streaming_request_is_aborted_and_recorded(api: Api) -> None:
    request = asyncio.create_task(api.client.post("/v1/chat/completions", json=body("scripted", "a @hold b")))
    while not api.scripted.generations:
        await asyncio.sleep(0.01)
    await api.drain(0.2)
    r = await asyncio.wait_for(request, 5)
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_aborted"
    [row] = await api.records()
    assert row["status"] == "error" and row["completion_tokens"] == 1


@pytest.mark.parametrize("model", ["remote", "routed"])
async def test_past_the_drain_time_a_remote_stream_ends_with_request_aborted(api: Api, model: str) -> None:
    """The deterministic remote-drain test: the upstream holds its stream open (it is never released), so
    when the drain time is up the stream is mid-flight; `abort_all` closes the upstream stream, the client's
    stream ends with the `request_aborted` event, and the usage row is written."""
    async with api.client.stream("POST", "/v1/chat/completions",
                                 json=body(model, "a @hold b", stream=True)) as r:
        lines = r.aiter_lines()
        assert await first_content(lines) == "a "
        await api.drain(0.2)
        rest = await read_to_the_end(lines)
    assert_aborted_in_band(rest)
    [row] = await api.records()
    assert row["status"] == "error" and row["model"] == model
    await api.transport.idle()
    upstream = api.upstreams["up-a" if model == "remote" else "up-b"]
    assert upstream.streams_started == 1
    for _ in range(100):  # the upstream app unwinds after the close reaches it
        if upstream.streams_closed_by_client == 1:
            break
        await asyncio.sleep(0.01)
    assert upstream.streams_closed_by_client == 1  # the upstream saw flashserve go away
    assert api.remote.load == 0 and api.router.load == 0
