"""Remote upstreams and the router, in-process: the real `RemoteBackend` and `Router` against fake
OpenAI-compatible upstream apps (`fakes.py: FakeUpstream`) through the streaming transport.

Covers: the upstream's own key and model name, usage normalized (DeepSeek's `prompt_cache_hit_tokens`)
and billed, streaming pass-through; refusals retried then mapped (502), a failure mid-stream reported
in-band and billed; the router's failover before the first byte (the failing replica leaves the rotation),
no replica left (503), an error mid-stream; and cancellation: a client leaving a remote or routed request
closes the upstream stream and gives the replica's load back, with one cancelled row.

Moved here from tests/e2e/test_remote_backend.py (answers, usage, billing, failures) and test_router.py
(the failover paths); a real upstream process and real workers stay there as smoke tests.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.api.conftest import API_KEY, UPSTREAM_KEY, Api
from tests.api.test_billing import body, first_content, until
from tests.api.test_streaming import chunks, sse_events

pytestmark = pytest.mark.anyio
HIT, MISS, OUT = 2_800, 140_000, 280_000  # pUSD a token at DeepSeek's prices


async def test_remote_answer_usage_and_billing(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("remote", "hello from afar", temperature=0.5))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["message"]["content"] == "hello from afar "
    usage = data["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (10, 3)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 4  # DeepSeek's prompt_cache_hit_tokens
    [row] = await api.records()
    assert row["status"] == "ok" and row["cost_pusd"] == 4 * HIT + 6 * MISS + 3 * OUT
    [sent] = api.upstreams["up-a"].seen
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}" and API_KEY not in json.dumps(sent)
    assert sent["body"]["model"] == "up-model" and sent["body"]["stream"] is True
    assert sent["body"]["temperature"] == 0.5


async def test_remote_stream_passes_through_with_usage(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("remote", "one two", stream=True,
                                                                stream_options={"include_usage": True}))
    cs = chunks(r.text)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in cs if c["choices"]) == "one two "
    assert cs[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 4
    assert [row["status"] for row in await api.records()] == ["ok"]


async def test_remote_refusals_are_retried_then_502_and_no_row(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("remote", "@refuse"))
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
    assert len(api.upstreams["up-a"].seen) == 2  # retries=1: tried twice, before any byte
    assert await api.records() == []


async def test_remote_connection_cut_mid_stream_is_in_band_and_billed(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("remote", "some words @cut", stream=True))
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_error"
    [row] = await api.records()
    assert row["status"] == "error"
    assert api.remote.load == 0


async def test_router_fails_over_before_the_first_byte(api: Api) -> None:
    api.upstreams["up-b"].down = True  # round robin tries up-b first
    r = await api.client.post("/v1/chat/completions", json=body("routed", "served anyway"))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "served anyway "
    assert len(api.upstreams["up-b"].seen) == 1 and len(api.upstreams["up-c"].seen) == 1
    report = (await api.admin.get("/admin/engine")).json()["models"]["routed"]
    health = {rep["name"]: rep["healthy"] for rep in report["replicas"]}
    assert health == {"up-b": False, "up-c": True}  # the failing replica left the rotation
    # Later requests go to the healthy replica only.
    for _ in range(2):
        assert (await api.client.post("/v1/chat/completions", json=body("routed", "again"))).status_code == 200
    assert len(api.upstreams["up-b"].seen) == 1
    assert [row["status"] for row in await api.records()] == ["ok"] * 3
    assert api.router.load == 0


async def test_router_without_a_replica_is_503_and_no_row(api: Api) -> None:
    for name in ("up-b", "up-c"):
        api.upstreams[name].down = True
    r = await api.client.post("/v1/chat/completions", json=body("routed", "nobody", stream=True))
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica_available"
    assert "retry-after" in r.headers
    assert await api.records() == [] and api.router.load == 0


@pytest.mark.parametrize("failure", ["@fail", "@cut"])
async def test_router_error_mid_stream_is_in_band_and_billed(api: Api, failure: str) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("routed", f"partial {failure}", stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_error"
    assert any(json.loads(e)["choices"][0]["delta"].get("content") == "partial " for e in events[:-2])
    [row] = await api.records()
    assert row["status"] == "error"
    assert api.router.load == 0
    report = (await api.admin.get("/admin/engine")).json()["models"]["routed"]
    assert not next(rep for rep in report["replicas"] if rep["name"] == "up-b")["healthy"]


@pytest.mark.parametrize("model", ["remote", "routed"])
async def test_a_client_leaving_a_remote_stream_closes_the_upstream(api: Api, model: str) -> None:
    upstream = api.upstreams["up-a" if model == "remote" else "up-b"]
    async with api.client.stream("POST", "/v1/chat/completions",
                                 json=body(model, "a @hold b", stream=True)) as r:
        assert await first_content(r) == "a "
        assert api.remote.load + api.router.load == 1
    await api.transport.idle()
    await until(lambda: upstream.streams_closed_by_client == 1)
    assert api.remote.load == 0 and api.router.load == 0
    [row] = await api.records()
    assert row["status"] == "cancelled" and row["model"] == model


@pytest.mark.parametrize("model", ["remote", "routed"])
async def test_a_non_streaming_client_leaving_a_remote_request_closes_the_upstream(api: Api, model: str) -> None:
    upstream = api.upstreams["up-a" if model == "remote" else "up-b"]
    request = asyncio.create_task(api.client.post("/v1/chat/completions", json=body(model, "a @hold b")))
    await until(lambda: upstream.streams_started == 1)
    await asyncio.sleep(0.05)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await api.transport.idle()
    await until(lambda: upstream.streams_closed_by_client == 1)
    assert api.remote.load == 0 and api.router.load == 0
    [row] = await api.records()
    assert row["status"] == "cancelled"


async def test_remote_refused_once_is_retried_and_a_4xx_is_the_clients_400(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("remote", "@refuse-once then fine"))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "then fine "
    assert len(api.upstreams["up-a"].seen) == 2  # retried: nothing had reached the client
    r = await api.client.post("/v1/chat/completions", json=body("remote", "@reject"))
    assert r.status_code == 400
    error = r.json()["error"]
    assert "Invalid max_tokens value" in error["message"] and error["code"] == "upstream_invalid_request"
    assert error["param"] == "max_tokens"
    assert [row["status"] for row in await api.records()] == ["ok"]


async def test_a_wrong_upstream_key_is_a_502_not_the_clients_fault(api: Api) -> None:
    r = await api.client.post("/v1/chat/completions", json=body("remote-wrong-key", "hi"))
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"
    assert await api.records() == []


async def test_an_upstream_that_stalls_times_out_with_504(api: Api) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    r = await api.client.post("/v1/chat/completions", json=body("remote-impatient", "@stall"))
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    assert len(api.upstreams["up-a"].seen) == 3  # the first try and its 2 retries, each bounded by 0.2 s
    assert loop.time() - started < 5
    assert await api.records() == []
