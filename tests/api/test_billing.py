"""Billing and admission, in-process: exactly one usage row per admitted request whatever ends it (the end,
an error, the client leaving mid-stream or mid-answer), the balance moving by exactly the recorded costs
under concurrency, 402 at zero balance, 429 over the key's RPM or concurrency, 503 when the engine's queue
is full; refused requests write no row.

Moved here from tests/e2e/test_ledger_integrity.py (concurrent debits, the stream cut by the client),
test_accounts_api.py (402, 429, balance = top-ups - costs), test_overload_and_shutdown.py (503 overloaded
with a queued stream keeping alive, a non-streaming client that leaves) and test_streaming.py (the
client's disconnect mid-stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.api.conftest import DEFAULT_BALANCE_PUSD, LOCAL_MAX_ACTIVE, Api

pytestmark = pytest.mark.anyio


def body(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def first_content(r: httpx.Response | AsyncIterator[str]) -> str:
    """Read the stream (a response, or its line iterator to go on reading later) until its first content."""
    lines = r.aiter_lines() if isinstance(r, httpx.Response) else r
    async for line in lines:
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return delta["content"]
    raise AssertionError("the stream ended before any content")


async def engine_report(api: Api) -> dict[str, Any]:
    r = await api.admin.get("/admin/engine")
    assert r.status_code == 200, r.text
    return r.json()["models"]


async def until(predicate: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- disconnects -------------------------------------------------------------------------------------------
async def test_disconnect_mid_stream_aborts_and_records_one_cancelled_row(api: Api) -> None:
    async with api.client.stream("POST", "/v1/chat/completions",
                                 json=body("scripted", "first @hold never", stream=True)) as r:
        assert await first_content(r) == "first "
    await api.transport.idle()
    [generation] = api.scripted.generations
    assert generation.aborted and generation.ended
    [row] = await api.records()
    assert row["status"] == "cancelled" and row["completion_tokens"] == 1 and row["cost_pusd"] > 0
    account = await api.default_account()
    assert await api.balance(account) == DEFAULT_BALANCE_PUSD - row["cost_pusd"]


@pytest.mark.parametrize("api", ["sqlite", "postgresql"], indirect=True)
async def test_disconnect_mid_stream_frees_the_real_engine(api: Api) -> None:
    account, key = await api.new_account("leaves")
    api.model.delay_s = 0.01  # 400 tokens would take 4 s: the client leaves long before
    async with api.http(key).stream("POST", "/v1/chat/completions",
                                    json=body("fake-local", "hello", stream=True, max_tokens=400)) as r:
        await first_content(r)
    await api.transport.idle()
    [row] = await api.records(account)
    assert row["status"] == "cancelled" and 0 < row["completion_tokens"] < 400 and row["cost_pusd"] > 0
    assert await api.balance(account) == 10**12 - row["cost_pusd"]
    report = (await engine_report(api))["fake-local"]
    assert report["invariants_ok"] and report["leaked_blocks"] == 0
    assert api.local.num_active == 0


async def test_a_non_streaming_client_that_leaves_aborts_its_request(api: Api) -> None:
    request = asyncio.create_task(api.client.post("/v1/chat/completions", json=body("scripted", "a @hold b")))
    await until(lambda: len(api.scripted.generations) == 1)
    await asyncio.sleep(0.05)  # the answer is being collected
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await api.transport.idle()
    [generation] = api.scripted.generations
    assert generation.aborted
    [row] = await api.records()
    assert row["status"] == "cancelled" and row["completion_tokens"] == 1


async def test_a_non_streaming_client_that_leaves_frees_the_real_engine(api: Api) -> None:
    api.model.delay_s = 0.01
    request = asyncio.create_task(api.client.post("/v1/chat/completions",
                                                  json=body("fake-local", "hello", max_tokens=400)))
    await until(lambda: api.local.num_active == 1)
    await asyncio.sleep(0.1)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await api.transport.idle()
    [row] = await api.records()
    assert row["status"] == "cancelled" and 0 < row["completion_tokens"] < 400
    assert api.local.num_active == 0
    assert (await engine_report(api))["fake-local"]["leaked_blocks"] == 0


# -- exactly once ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["sqlite", "postgresql"], indirect=True)
async def test_concurrent_requests_write_one_row_each_and_debit_exactly_their_costs(api: Api) -> None:
    account, key = await api.new_account("busy", balance_usd="5")
    client = api.http(key)
    before = await api.balance(account)

    async def one(i: int) -> float:
        model = "fake-local" if i % 6 == 0 else "scripted"  # at most LOCAL_MAX_ACTIVE local
        words = " ".join(f"w{j}" for j in range(i % 5 + 1))
        if i % 2:
            r = await client.post("/v1/chat/completions", json=body(model, words, max_tokens=8, temperature=0))
            assert r.status_code == 200, r.text
            return float(r.json()["usage"]["cost"])
        r = await client.post("/v1/chat/completions", json=body(model, words, max_tokens=8, temperature=0,
                                                                stream=True, stream_options={"include_usage": True}))
        assert r.status_code == 200, r.text
        last = json.loads([line for line in r.text.split("\n\n") if line.startswith("data: {")][-1][6:])
        return float(last["usage"]["cost"])

    n = 24
    costs = await asyncio.gather(*(one(i) for i in range(n)))
    rows = await api.records(account)
    assert len(rows) == n and len({row["request_id"] for row in rows}) == n
    assert all(row["status"] == "ok" for row in rows)
    spent = sum(row["cost_pusd"] for row in rows)
    assert before - await api.balance(account) == spent
    assert sum(costs) == pytest.approx(spent / 1e12)
    audit = await api.audit(account)
    assert audit["spent_pusd"] == spent and audit["balance_pusd"] == before - spent
    r = await api.admin.get("/admin/usage", params={"account_id": account, "group_by": "key"})
    [group] = r.json()["data"]
    assert (group["requests"], group["cost_pusd"]) == (n, spent)


# -- admission: 402, 429, 503 ----------------------------------------------------------------------------
async def test_zero_balance_is_402_until_topped_up(api: Api) -> None:
    account, key = await api.new_account("broke", balance_usd="0")
    client = api.http(key)
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json=body("scripted", "hi", stream=stream))
        assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance"
    assert await api.records(account) == [] and api.scripted.generations == []
    r = await api.admin.post(f"/admin/accounts/{account}/top-up", json={"amount_usd": "0.01"})
    assert r.status_code == 200
    assert (await client.post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200
    assert len(await api.records(account)) == 1


async def test_rpm_limit_is_429_with_retry_after_and_no_row(api: Api) -> None:
    account, key = await api.new_account("rpm", rpm=2)
    client = api.http(key)
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200
    r = await client.post("/v1/chat/completions", json=body("scripted", "hi"))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert len(await api.records(account)) == 2 and len(api.scripted.generations) == 2


async def test_concurrency_limit_is_429_while_a_stream_runs(api: Api) -> None:
    account, key = await api.new_account("one-at-a-time", max_concurrent=1)
    client = api.http(key)
    async with client.stream("POST", "/v1/chat/completions", json=body("scripted", "a @hold b", stream=True)) as r:
        lines = r.aiter_lines()
        await first_content(lines)
        second = await client.post("/v1/chat/completions", json=body("scripted", "hi"))
        assert second.status_code == 429 and "retry-after" in second.headers
        api.scripted.release()
        assert [line async for line in lines if line][-1] == "data: [DONE]"
    await api.transport.idle()
    assert (await client.post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200
    assert [row["status"] for row in await api.records(account)] == ["ok", "ok"]


async def test_a_full_engine_queue_is_503_overloaded_and_queued_streams_keep_alive(api: Api) -> None:
    api.model.delay_s = 0.02
    streams = [api.client.stream("POST", "/v1/chat/completions",
                                 json=body("fake-local", f"q{i}", stream=True, max_tokens=300))
               for i in range(LOCAL_MAX_ACTIVE)]
    responses = [await s.__aenter__() for s in streams]
    try:
        assert all(r.status_code == 200 for r in responses)
        await until(lambda: api.local.num_active == LOCAL_MAX_ACTIVE)
        r = await api.client.post("/v1/chat/completions", json=body("fake-local", "one more"))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
        # The engine runs max_num_seqs=4 at once, so all four are admitted; each sends keep-alives or tokens.
        seen = ""
        async for piece in responses[0].aiter_text():
            seen += piece
            if "data: {" in seen.split("\n\n", 1)[-1]:
                break
    finally:
        for s in streams:
            await s.__aexit__(None, None, None)
    await api.transport.idle()
    rows = await api.records()
    assert len(rows) == LOCAL_MAX_ACTIVE and {row["status"] for row in rows} == {"cancelled"}
    api.model.delay_s = 0.0
    assert (await api.client.post("/v1/chat/completions", json=body("fake-local", "again", max_tokens=2))
            ).status_code == 200


async def test_two_simultaneous_streams_on_a_one_at_a_time_key_one_is_429(api: Api) -> None:
    account, key = await api.new_account("simultaneous", max_concurrent=1)
    client = api.http(key)
    request = body("scripted", "a @hold b", stream=True)
    tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=request)) for _ in range(2)]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    [refused] = [t.result() for t in done]
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" in refused.headers
    api.scripted.release()
    results = await asyncio.gather(*tasks)
    assert sorted(r.status_code for r in results) == [200, 429]
    [row] = await api.records(account)
    assert row["status"] == "ok" and row["completion_tokens"] == 2


async def test_admin_engine_report_shows_the_block_pool_sound(api: Api) -> None:
    assert (await api.client.get("/admin/engine")).status_code in (401, 403)  # an API key is not enough
    for i in range(3):
        r = await api.client.post("/v1/chat/completions", json=body("fake-local", f"prompt number {i}", max_tokens=8))
        assert r.status_code == 200
    report = (await engine_report(api))["fake-local"]
    assert report["invariants_ok"] and report["leaked_blocks"] == 0 and report["active_requests"] == 0
    assert report["free_blocks"] + report["used_blocks"] == report["total_blocks"]
    assert report["cached_blocks"] > 0  # the finished prompts stay in the prefix cache, free but kept
