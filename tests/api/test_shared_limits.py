"""Limits per key, per account (all its keys together) and per end user (the request's `user`, Anthropic's
`metadata.user_id`, the Responses API's `user`), set with the admin API; 429s in each surface's shape naming
the limit; and the shared limiter's failure modes when its Redis is unreachable (closed: 503 in the
surface's shape, nothing generated; open: served, a warning logged without the Redis password)."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import pytest

from flashserve.accounts.redis_limits import RedisLimiter
from flashserve.api.state import app_state
from flashserve.catalog import make_card
from flashserve.chat.reasoning import ReasoningSpec
from tests.api.conftest import Api
from tests.api.test_anthropic import MODEL, AgentBackend, H, assert_error, msg
from tests.api.test_billing import body, first_content
from tests.redis_server import _free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def agent(api: Api) -> AgentBackend:
    """The Anthropic and Responses surfaces' model (`MODEL`), as tests/api/test_anthropic.py sets it up."""
    backend = AgentBackend()
    state = app_state(api.app)
    state.catalog.add(make_card(MODEL, context_length=4096, reasoning=ReasoningSpec(can_think=True),
                                weights="none", description="agent turns", created=int(time.time())), backend)
    state.anthropic_models = {"claude-*": MODEL}
    return backend


def assert_openai_429(r: httpx.Response, *named: str) -> str:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    for part in named:
        assert part in error["message"], error["message"]
    return str(error["message"])


async def second_key(api: Api, account: str, **limits: int) -> str:
    r = await api.admin.post("/admin/keys", json={"account_id": account, **limits})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


async def set_limits(api: Api, account: str, **limits: Any) -> dict[str, Any]:
    r = await api.admin.post(f"/admin/accounts/{account}/limits", json=limits)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_key_limit_429_names_the_key_and_limit_in_each_surface(api: Api, agent: AgentBackend) -> None:
    account, key = await api.new_account("key-rpm", rpm=1)
    client = api.http(key)
    assert (await client.post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200
    key_id = (await api.admin.get("/admin/keys", params={"account_id": account})).json()["data"][0]["id"]
    assert_openai_429(await client.post("/v1/chat/completions", json=body("scripted", "hi")),
                      f"key {key_id}", "1 requests per minute")
    r = await client.post("/v1/messages", json=msg("x"), headers=H)
    assert "1 requests per minute" in assert_error(r, 429, "rate_limit_error") and int(r.headers["retry-after"]) >= 1
    assert_openai_429(await client.post("/v1/responses", json={"model": MODEL, "input": "x"}), f"key {key_id}")
    assert len(await api.records(account)) == 1


async def test_account_concurrency_holds_across_its_keys(api: Api) -> None:
    account, key_a = await api.new_account("acct-conc")
    key_b = await second_key(api, account)
    _, other = await api.new_account("acct-conc-other")
    view = await set_limits(api, account, max_concurrent=1)
    assert view["max_concurrent"] == 1 and view["rpm"] is None and view["user_rpm"] is None
    async with api.http(key_a).stream("POST", "/v1/chat/completions",
                                      json=body("scripted", "a @hold b", stream=True)) as r:
        await first_content(r.aiter_lines())
        assert_openai_429(await api.http(key_b).post("/v1/chat/completions", json=body("scripted", "hi")),
                          f"account {account}", "limit 1")
        # another account's keys are not held back
        assert (await api.http(other).post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200
        api.scripted.release()
    await api.transport.idle()
    assert (await api.http(key_b).post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200
    cleared = await set_limits(api, account, max_concurrent=None)  # null: unlimited again
    assert cleared["max_concurrent"] is None


async def test_admin_limits_api_validates_and_404s(api: Api) -> None:
    account, _ = await api.new_account("acct-admin")
    r = await api.admin.post(f"/admin/accounts/{account}/limits", json={"rpm": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rpm"
    r = await api.admin.post(f"/admin/accounts/{account}/limits", json={"per_day": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "per_day"
    r = await api.admin.post("/admin/accounts/acct_missing/limits", json={"rpm": 3})
    assert r.status_code == 404 and r.json()["error"]["code"] == "account_not_found"
    assert (await api.client.post(f"/admin/accounts/{account}/limits", json={"rpm": 3})).status_code in (401, 403)
    await set_limits(api, account, rpm=5, user_tpm=100)
    view = await set_limits(api, account, tpm=1000)  # only the fields sent change
    assert (view["rpm"], view["tpm"], view["user_tpm"]) == (5, 1000, 100)
    key_id = (await api.admin.get("/admin/keys", params={"account_id": account})).json()["data"][0]["id"]
    r = await api.admin.post(f"/admin/keys/{key_id}/limits", json={"max_concurrent": 2})
    assert r.status_code == 200 and r.json()["max_concurrent"] == 2 and "key" not in r.json()
    assert (await api.admin.post("/admin/keys/key_missing/limits", json={"rpm": 1})).status_code == 404


async def test_end_user_sub_limits_on_every_surface(api: Api, agent: AgentBackend) -> None:
    account, key = await api.new_account("acct-users")
    await set_limits(api, account, user_rpm=1)
    client = api.http(key)
    chat = body("scripted", "hi", user="alice")
    assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    message = assert_openai_429(await client.post("/v1/chat/completions", json=chat), "end user",
                                "1 requests per minute")
    assert "alice" not in message
    assert (await client.post("/v1/chat/completions", json={**chat, "user": "bob"})).status_code == 200
    assert (await client.post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200  # no user
    assert (await client.post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200

    anthropic = msg("x", metadata={"user_id": "carol"})
    assert (await client.post("/v1/messages", json=anthropic, headers=H)).status_code == 200
    assert "end user" in assert_error(await client.post("/v1/messages", json=anthropic, headers=H), 429,
                                      "rate_limit_error")
    responses = {"model": MODEL, "input": "x", "user": "dave"}
    assert (await client.post("/v1/responses", json=responses)).status_code == 200
    assert_openai_429(await client.post("/v1/responses", json=responses), "end user")
    # The same end user name in another account has its own count.
    other, other_key = await api.new_account("acct-users-2")
    await set_limits(api, other, user_rpm=1)
    assert (await api.http(other_key).post("/v1/chat/completions", json=chat)).status_code == 200


# -- the shared limiter, its Redis unreachable ---------------------------------------------------------------
def unreachable(mode: str) -> RedisLimiter:
    return RedisLimiter(f"redis://operator:s3cret-pw@127.0.0.1:{_free_port()}/0", failure_mode=mode, timeout_s=0.3)


async def test_redis_down_fail_closed_is_503_in_each_surface(api: Api, agent: AgentBackend) -> None:
    api.accounts.limiter = unreachable("closed")
    account, key = await api.new_account("closed", rpm=100)
    client = api.http(key)
    r = await client.post("/v1/chat/completions", json=body("scripted", "hi"))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "limits_unavailable"
    r = await client.post("/v1/messages", json=msg("x"), headers=H)
    assert_error(r, 529, "overloaded_error")  # Anthropic's shape of a 503: what its clients retry
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "limits_unavailable"
    assert await api.records(account) == [] and api.scripted.generations == []
    # A key limited in no scope never asks Redis, so it is served.
    assert (await api.client.post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200


async def test_redis_down_fail_open_serves_and_warns_without_secrets(api: Api,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    api.accounts.limiter = unreachable("open")
    account, key = await api.new_account("open", max_concurrent=5)
    with caplog.at_level(logging.WARNING, logger="flashserve.accounts.redis_limits"):
        r = await api.http(key).post("/v1/chat/completions", json=body("scripted", "hi"))
    assert r.status_code == 200
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert any("unreachable" in w and "redis_failure_mode = open" in w for w in warnings), warnings
    assert not any("s3cret" in w or "operator" in w or key in w for w in warnings)
    assert len(await api.records(account)) == 1


async def test_a_real_redis_limits_the_app(api: Api, redis_url: str) -> None:
    api.accounts.limiter = RedisLimiter(redis_url, prefix=f"api-{_free_port()}", failure_mode="closed")
    _, key = await api.new_account("redis-rpm", rpm=2)
    client = api.http(key)
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=body("scripted", "hi"))).status_code == 200
    assert_openai_429(await client.post("/v1/chat/completions", json=body("scripted", "hi")), "2 requests per minute")


class BrokenLease:
    async def release(self, tokens: int = 0) -> None:
        raise RuntimeError("the limiter broke")


class BrokenLimiter:
    async def acquire(self, scopes: object) -> BrokenLease:
        return BrokenLease()

    async def close(self) -> None:
        return None


async def test_a_limiter_failing_at_release_does_not_cost_the_usage_row(api: Api) -> None:
    api.accounts.limiter = BrokenLimiter()
    account, key = await api.new_account("broken-limiter", rpm=3)
    r = await api.http(key).post("/v1/chat/completions", json=body("scripted", "hi"))
    assert r.status_code == 200
    [row] = await api.records(account)
    assert row["status"] == "ok"
