"""Reserved balances, in-process (issue 18 §2): the worst-case cost is held at admission, so concurrency
cannot overspend; a small balance clamps max_tokens (finish_reason "length", the clamp header); 402 before
any model work when not even the prompt and one token fit (each surface in its own shape); spending caps
per key count reservations; grants are spent first and `GET /user/balance` shows both kinds; a ledger that
cannot be reached is 503 with no model work; a settlement the database cannot take goes to the outbox and
is written exactly once when it answers. Every test ends with the ledger audit.

Prices: the reference card's, 140,000 pUSD per prompt token (cache miss) and 280,000 per output token. The
scripted backend counts one prompt token per word of the messages and one output token per script word.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from flashserve.accounts.pricing import PUSD_PER_USD, format_usd
from flashserve.api.state import app_state
from tests.api.conftest import Api

pytestmark = pytest.mark.anyio
MISS, OUT = 140_000, 280_000  # pUSD per token


def body(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def audit_ok(api: Api, account: str) -> dict[str, Any]:
    row = await api.audit(account)
    assert row["ok"], row
    assert row["balance_pusd"] >= 0 and row["reserved_pusd"] == 0 and row["open_reservations"] == 0, row
    return row


async def until(predicate: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("api", ["sqlite", "postgresql"], indirect=True)
async def test_concurrent_requests_cannot_reserve_more_than_the_balance(api: Api) -> None:
    """Twenty requests at once, each held open by its script, on a balance that pays for three: three run,
    the others get 402 before any model work, and the balance never goes below zero."""
    per_request = 3 * MISS + 2 * OUT  # "w1 w2 @hold": 3 prompt words; max_tokens 2
    account, key = await api.new_account("thin", balance_usd=format_usd(3 * per_request + 10_000))
    client = api.http(key)
    opened_before = len(api.scripted.generations)

    async def one() -> httpx.Response:
        return await client.post("/v1/chat/completions", json=body("scripted", "w1 w2 @hold", max_tokens=2))

    tasks = [asyncio.create_task(one()) for _ in range(20)]
    await until(lambda: len(api.scripted.generations) - opened_before >= 3 and sum(t.done() for t in tasks) >= 17)
    held = await api.audit(account)
    assert held["ok"] and held["open_reservations"] == 3 and held["reserved_pusd"] == 3 * per_request, held
    assert held["balance_pusd"] >= 0
    api.scripted.release()
    responses = await asyncio.gather(*tasks)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 3 + [402] * 17, statuses
    refused = next(r for r in responses if r.status_code == 402).json()["error"]
    assert refused["code"] == "insufficient_balance" and "one output token" in refused["message"]
    assert len(api.scripted.generations) - opened_before == 3
    rows = await api.records(account)
    assert len(rows) == 3 and all(r["cost_pusd"] == per_request for r in rows)
    after = await audit_ok(api, account)
    assert after["balance_pusd"] == 10_000  # the $1e-8 left over


async def test_a_small_balance_clamps_max_tokens_and_ends_with_length(api: Api) -> None:
    """The real engine (fake-local): a balance worth the prompt and 5 output tokens runs the request with
    max_tokens 5, says so in x-flashserve-max-tokens-clamped, and ends with finish_reason "length"."""
    probe = await api.client.post("/v1/chat/completions", json=body("fake-local", "hi", max_tokens=1))
    prompt = probe.json()["usage"]["prompt_tokens"]
    account, key = await api.new_account("clamped", balance_usd=format_usd(prompt * MISS + 5 * OUT))
    client = api.http(key)
    r = await client.post("/v1/chat/completions", json=body("fake-local", "hi", max_tokens=300, temperature=0))
    assert r.status_code == 200, r.text
    assert r.headers["x-flashserve-max-tokens-clamped"] == "5"
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 5
    assert (await audit_ok(api, account))["balance_pusd"] == 0
    # and the next one cannot pay for its prompt: 402, in OpenAI's shape and in Anthropic's
    r = await client.post("/v1/chat/completions", json=body("fake-local", "hi", stream=True))
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance"
    r = await client.post("/v1/messages", json={"model": "fake-local", "max_tokens": 10,
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 402 and r.json()["type"] == "error", r.text
    assert r.json()["error"]["type"] == "billing_error"
    assert len(await api.records(account)) == 1


async def test_the_clamp_header_comes_on_streams_and_every_surface(api: Api) -> None:
    probe = await api.client.post("/v1/chat/completions", json=body("fake-local", "hi", max_tokens=1))
    prompt = probe.json()["usage"]["prompt_tokens"]
    account, key = await api.new_account("surfaces", balance_usd=format_usd(prompt * MISS + 4 * OUT))
    client = api.http(key)
    async with client.stream("POST", "/v1/chat/completions",
                             json=body("fake-local", "hi", max_tokens=50, stream=True)) as r:
        assert r.status_code == 200 and r.headers["x-flashserve-max-tokens-clamped"] == "4"
        chunks = [json.loads(line[6:]) for line in [x async for x in r.aiter_lines()] if line.startswith("data: {")]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    await audit_ok(api, account)
    r = await api.admin.post(f"/admin/accounts/{account}/top-up",
                             json={"amount_usd": format_usd(prompt * MISS + 3 * OUT)})
    assert r.status_code == 200
    r = await client.post("/v1/messages", json={"model": "fake-local", "max_tokens": 50,
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    # Anthropic's template renders the prompt a little differently: whatever fits is what the header says
    clamp = int(r.headers["x-flashserve-max-tokens-clamped"])
    assert 1 <= clamp < 50 and r.json()["usage"]["output_tokens"] == clamp and r.json()["stop_reason"] == "max_tokens"
    await audit_ok(api, account)


async def test_spending_caps_count_reservations_and_name_the_cap(api: Api) -> None:
    per_request = 3 * MISS + 2 * OUT
    account, key = await api.new_account("capped", balance_usd="1")
    r = await api.admin.get("/admin/keys", params={"account_id": account})
    key_id = r.json()["data"][0]["id"]
    r = await api.admin.post(f"/admin/keys/{key_id}/caps",
                             json={"daily_cap_usd": format_usd(2 * per_request)})
    assert r.status_code == 200 and r.json()["daily_cap_usd"] == "0.00000196", r.text
    client = api.http(key)
    tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=body("scripted", "w1 w2 @hold",
                                                                               max_tokens=2)))
             for _ in range(6)]
    await until(lambda: sum(t.done() for t in tasks) >= 4)
    api.scripted.release()
    responses = await asyncio.gather(*tasks)
    assert sorted(r.status_code for r in responses) == [200, 200, 402, 402, 402, 402]
    error = next(r for r in responses if r.status_code == 402).json()["error"]
    assert error["code"] == "spending_cap_exceeded" and "daily spending cap of $0.00000196" in error["message"]
    # the cap spent, the next request is refused too; a monthly cap alone lets it through
    r = await client.post("/v1/chat/completions", json=body("scripted", "w1", max_tokens=1))
    assert r.status_code == 402 and "daily" in r.json()["error"]["message"]
    r = await api.admin.post(f"/admin/keys/{key_id}/caps", json={"monthly_cap_usd": "0.5"})
    assert r.json()["daily_cap_usd"] is None and r.json()["monthly_cap_usd"] == "0.5"
    assert (await client.post("/v1/chat/completions", json=body("scripted", "w1", max_tokens=1))).status_code == 200
    for bad in ("-1", "1e30", "lots"):
        r = await api.admin.post(f"/admin/keys/{key_id}/caps", json={"daily_cap_usd": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "daily_cap_usd", r.text
    await audit_ok(api, account)


async def test_granted_credit_is_spent_first_and_user_balance_shows_both(api: Api) -> None:
    account, key = await api.new_account("promo", balance_usd="1")
    r = await api.admin.post(f"/admin/accounts/{account}/grant", json={"amount_usd": "0.000001"})
    assert r.status_code == 200 and r.json()["granted_pusd"] == 10**6, r.text
    client = api.http(key)
    for path in ("/user/balance", "/v1/user/balance"):
        r = await client.get(path)
        assert r.status_code == 200, r.text
        assert r.json() == {"is_available": True, "balance_infos": [{
            "currency": "USD", "total_balance": "1.000001", "granted_balance": "0.000001",
            "topped_up_balance": "1.00"}]}
    r = await client.post("/v1/chat/completions", json=body("scripted", "w1 w2 w3", max_tokens=3))
    cost = 3 * MISS + 3 * OUT  # 1,260,000 pUSD: the grant (1,000,000) first, then 260,000 topped up
    assert r.status_code == 200 and r.headers["x-flashserve-cost-usd"] == "0.00000126"
    info = (await client.get("/user/balance")).json()["balance_infos"][0]
    assert info == {"currency": "USD", "total_balance": "0.99999974", "granted_balance": "0.00",
                    "topped_up_balance": "0.99999974"}
    row = await audit_ok(api, account)
    assert row["credits_pusd"] == PUSD_PER_USD + 10**6 and row["charges_pusd"] == cost
    r = await api.client.get("/user/balance", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


async def test_an_unreachable_ledger_is_503_with_no_model_work(api: Api) -> None:
    accounts = app_state(api.app).accounts
    real = accounts.engine
    opened = len(api.scripted.generations)
    accounts.engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:9/none",
                                          connect_args={"timeout": 2})
    try:
        r = await api.client.post("/v1/chat/completions", json=body("scripted", "w1", max_tokens=1))
        assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable", r.text
        assert r.headers["retry-after"] == "2"
        r = await api.client.get("/user/balance")
        assert r.status_code == 503
    finally:
        await accounts.engine.dispose()
        accounts.engine = real
    assert len(api.scripted.generations) == opened


async def test_a_settlement_the_database_cannot_take_is_written_once_from_the_outbox(api: Api) -> None:
    account, key = await api.new_account("outbox", balance_usd="1")
    client = api.http(key)
    accounts = app_state(api.app).accounts
    task = asyncio.create_task(client.post("/v1/chat/completions", json=body("scripted", "w1 @hold w2",
                                                                             max_tokens=5)))
    await until(lambda: any(not g.ended for g in api.scripted.generations))
    real = accounts.engine
    accounts.engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:9/none",
                                          connect_args={"timeout": 1})
    try:
        api.scripted.release()
        r = await task
        assert r.status_code == 200  # the answer is the client's; its settlement waits in the outbox
        assert len(accounts.outbox.pending()) == 1
    finally:
        await accounts.engine.dispose()
        accounts.engine = real
    assert await api.records(account) == []
    assert (await api.audit(account))["open_reservations"] == 1
    await until(lambda: not accounts.outbox.pending(), timeout_s=10)  # the upkeep loop replays it
    rows = await api.records(account)
    assert len(rows) == 1 and rows[0]["completion_tokens"] == 2 and rows[0]["cost_pusd"] == 3 * MISS + 2 * OUT
    # a second replay of the same settlement (a crash after the commit, before the file was rewritten) is a no-op
    await accounts.outbox.append({"op": "settle", "charge": {
        "request_id": rows[0]["request_id"], "account_id": account, "key_id": rows[0]["key_id"], "model": "scripted",
        "prompt_tokens": 3, "cached_tokens": 0, "completion_tokens": 2, "reasoning_tokens": 0,
        "cost_pusd": 3 * MISS + 2 * OUT, "status": "ok", "latency_ms": 1}})
    assert await accounts.replay_outbox() == 1
    assert len(await api.records(account)) == 1
    row = await audit_ok(api, account)
    assert row["balance_pusd"] == PUSD_PER_USD - (3 * MISS + 2 * OUT)
