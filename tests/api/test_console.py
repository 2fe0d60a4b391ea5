"""The console's server side, in process (fast; the browser tier drives the same pages in Chromium):
sessions and their CSRF tokens, the sign-in rate limit, security headers, the playground endpoint billing
the session's key through the shared core, model pages agreeing with GET /v1/models/{id}, account
isolation, top-up codes redeemed exactly once (also when raced), and sign-out."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from flashserve.api.console import session as sessions
from tests.api.conftest import ADMIN_KEY, API_KEY, BASE, Api

pytestmark = pytest.mark.anyio


def browser(api: Api) -> httpx.AsyncClient:
    """A cookie-keeping client without an Authorization header: what a browser is to the console."""
    c = httpx.AsyncClient(transport=api.transport, base_url=BASE, timeout=30.0)
    api._clients.append(c)
    return c


def csrf_in(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert match, html[:500]
    return match.group(1)


async def signed_in(api: Api, key: str = API_KEY) -> tuple[httpx.AsyncClient, str]:
    """A browser signed in with `key`, and its CSRF token."""
    c = browser(api)
    token = csrf_in((await c.get("/console/signin")).text)
    r = await c.post("/console/signin", data={"csrf": token, "api_key": key})
    assert r.status_code == 303, r.text
    return c, csrf_in((await c.get("/console/models")).text)


async def test_root_redirects_and_pages_carry_security_headers(api: Api) -> None:
    c = browser(api)
    r = await c.get("/")
    assert r.status_code == 307 and r.headers["location"] == "/console/"
    r = await c.get("/console/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text and " on" + "click=" not in r.text  # no inline script
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    behind_tls = await browser(api).get("/console/", headers={"x-forwarded-proto": "https"})
    assert "secure" in behind_tls.headers["set-cookie"].lower()
    assert "content-security-policy" not in (await api.client.get("/v1/models")).headers  # the API is untouched


async def test_model_pages_agree_with_the_models_api(api: Api) -> None:
    c = browser(api)
    models = (await api.client.get("/v1/models")).json()["data"]
    for model in models:
        html = (await c.get(f"/console/models/{model['id']}")).text
        api_view = (await api.client.get(f"/v1/models/{model['id']}")).json()
        for testid, field in (("model-price-cache-hit", "input_cache_hit_per_million_usd"),
                              ("model-price-cache-miss", "input_cache_miss_per_million_usd"),
                              ("model-price-output", "output_per_million_usd")):
            shown = re.search(rf'data-testid="{testid}">([^<]+)<', html)
            assert shown and shown.group(1) == api_view["pricing"][field], (model["id"], testid)
        shown_json = re.search(r'data-testid="model-json">([^<]+)</code>', html)
        assert shown_json and json.loads(shown_json.group(1).replace("&#34;", '"').replace("&quot;", '"')) == api_view
    assert (await c.get("/console/models/no/such-model")).status_code == 404


async def test_pages_need_the_right_sign_in(api: Api) -> None:
    c = browser(api)
    for path in ("/console/keys", "/console/usage", "/console/playground", "/console/usage.csv"):
        r = await c.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/console/signin"), path
    user, _ = await signed_in(api)
    r = await user.get("/console/admin/engine")
    assert r.status_code == 303 and "admin=1" in r.headers["location"]
    admin, _ = await signed_in(api, ADMIN_KEY)
    r = await admin.get("/console/admin/engine")
    assert r.status_code == 200
    report = (await api.admin.get("/admin/engine")).json()
    for model_id in report["models"]:
        assert f'data-model="{model_id}"' in r.text


async def test_state_changes_need_the_csrf_token(api: Api) -> None:
    c, token = await signed_in(api)
    before = len(await api.accounts.keys.list(await api.default_account()))
    for data in ({"name": "x"}, {"name": "x", "csrf": "forged"}, {"name": "x", "csrf": token + "A"}):
        r = await c.post("/console/keys", data=data)
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    r = await c.post("/console/api/chat/completions", json={"model": "scripted", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 403
    assert len(await api.accounts.keys.list(await api.default_account())) == before
    # Another visitor's token is not this session's.
    other, other_token = await signed_in(api)
    assert (await c.post("/console/keys", data={"name": "x", "csrf": other_token})).status_code == 403
    assert (await c.post("/console/keys", data={"name": "x", "csrf": token})).status_code == 201
    # The sign-in form is protected too (no login CSRF).
    assert (await browser(api).post("/console/signin", data={"api_key": API_KEY})).status_code == 403


async def test_a_tampered_or_expired_cookie_is_no_session(api: Api) -> None:
    c, _ = await signed_in(api)
    cookie = c.cookies[sessions.COOKIE]
    payload, signature = cookie.split(".")
    session = sessions.decode(cookie, api.app.state.flashserve.server_key)
    assert session is not None and session.account_id == await api.default_account()
    assert sessions.decode(payload + "." + signature[:-2] + "AA", api.app.state.flashserve.server_key) is None
    forged = browser(api)
    forged.cookies.set(sessions.COOKIE, payload.replace("a", "b", 1) + "." + signature)
    assert (await forged.get("/console/keys")).status_code == 303
    expired = sessions.new_session(-10, account_id=session.account_id, key_id=session.key_id)
    assert sessions.decode(sessions.encode(expired, api.app.state.flashserve.server_key),
                           api.app.state.flashserve.server_key) is None


async def test_sign_in_is_rate_limited(api: Api) -> None:
    c = browser(api)
    token = csrf_in((await c.get("/console/signin")).text)
    statuses = [(await c.post("/console/signin", data={"csrf": token, "api_key": f"sk-wrong-{i}"})).status_code
                for i in range(12)]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    # Even the right key waits now: a guesser cannot tell it found one.
    r = await c.post("/console/signin", data={"csrf": token, "api_key": API_KEY})
    assert r.status_code == 429 and "Too many" in r.text


async def test_playground_bills_the_session_key_through_the_core(api: Api) -> None:
    account, key = await api.new_account("pg")
    c, token = await signed_in(api, key)
    body = {"model": "fake-local", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}}
    async with c.stream("POST", "/console/api/chat/completions", json=body, headers={"x-csrf-token": token}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        request_id = r.headers["x-request-id"]
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])["usage"]
    [record] = await api.records(account)
    key_id = (await api.accounts.keys.find(key))["id"]
    assert record["x_request_id"] == request_id and record["key_id"] == key_id
    assert record["completion_tokens"] == usage["completion_tokens"]
    row = (await c.get(f"/console/api/requests/{request_id}")).json()
    assert row["cost_usd"] == record["cost_usd"] and row["cost_pusd"] > 0
    # Errors come in the OpenAI shape, naming the field.
    r = await c.post("/console/api/chat/completions", json={"model": "fake-local", "messages": []},
                     headers={"x-csrf-token": token})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


async def test_accounts_never_see_each_other(api: Api) -> None:
    account_a, key_a = await api.new_account("iso-a")
    _, key_b = await api.new_account("iso-b")
    r = await api.http(key_a).post("/v1/chat/completions", json={"model": "scripted", "messages": [
        {"role": "user", "content": "A's secret"}]})
    request_a = r.json()["id"]
    key_id_a = (await api.accounts.keys.find(key_a))["id"]
    b, token_b = await signed_in(api, key_b)
    for path in ("/console/keys", "/console/usage", "/console/usage.csv"):
        text = (await b.get(path)).text
        assert key_id_a not in text and request_a not in text and account_a not in text, path
    assert (await b.get(f"/console/api/requests/{request_a}")).status_code == 404
    assert (await b.post(f"/console/keys/{key_id_a}/revoke", data={"csrf": token_b})).status_code == 404
    assert (await b.post(f"/console/keys/{key_id_a}/limits", data={"csrf": token_b, "rpm": "1"})).status_code == 404
    assert (await api.accounts.keys.get(key_id_a))["revoked_at"] is None
    assert (await api.accounts.keys.get(key_id_a))["rpm"] is None
    assert (await b.get("/console/admin/usage")).status_code == 303


async def test_limits_revoke_and_revoking_the_session_key_ends_the_session(api: Api) -> None:
    account, key = await api.new_account("own")
    c, token = await signed_in(api, key)
    key_id = (await api.accounts.keys.find(key))["id"]
    assert (await c.post(f"/console/keys/{key_id}/limits", data={"csrf": token, "rpm": "0"})).status_code == 400
    assert (await c.post(f"/console/keys/{key_id}/limits", data={"csrf": token, "rpm": "7", "tpm": ""})
            ).status_code == 200
    assert (await api.accounts.keys.get(key_id))["rpm"] == 7
    r = await c.post("/console/keys", data={"csrf": token, "name": "second"})
    second = re.search(r'data-testid="new-key-value">([^<]+)<', r.text).group(1)
    assert (await api.http(second).get("/v1/models")).status_code == 200
    assert second not in (await c.get("/console/keys")).text  # shown once
    await c.post(f"/console/keys/{key_id}/revoke", data={"csrf": token})
    assert (await api.http(key).get("/v1/models")).status_code == 401
    assert (await c.get("/console/keys")).status_code == 303  # the session rode on that key


async def test_sign_out_clears_the_session(api: Api) -> None:
    c, token = await signed_in(api)
    r = await c.post("/console/signout", data={"csrf": token})
    assert r.status_code == 303 and sessions.COOKIE not in c.cookies
    assert (await c.get("/console/keys")).status_code == 303


@pytest.mark.parametrize("api", ["sqlite", "postgresql"], indirect=True)
async def test_a_top_up_code_is_redeemed_once_even_when_raced(api: Api) -> None:
    admin, admin_token = await signed_in(api, ADMIN_KEY)
    r = await admin.post("/console/admin/codes", data={"csrf": admin_token, "count": "3", "amount_usd": "0.25"})
    codes = re.search(r'data-testid="new-codes-list">([^<]+)<', r.text).group(1).split()
    assert len(codes) == 3
    account, key = await api.new_account("redeemer", balance_usd="1")
    c, token = await signed_in(api, key)
    r = await c.post("/console/redeem", data={"csrf": token, "code": codes[0]})
    assert r.status_code == 200 and "$0.25" in r.text
    r = await c.post("/console/redeem", data={"csrf": token, "code": codes[0]})
    assert r.status_code == 409 and "already been redeemed" in r.text
    assert (await c.post("/console/redeem", data={"csrf": token, "code": "fs-topup-nope"})).status_code == 400
    # Ten redemptions of one code at once: exactly one credit.
    results = await asyncio.gather(*(api.accounts.codes.redeem(codes[1], account) for _ in range(10)),
                                   return_exceptions=True)
    assert sum(not isinstance(x, Exception) for x in results) == 1
    assert await api.balance(account) == 1_500_000_000_000
    audit = await api.audit(account)
    assert audit["balance_pusd"] == audit["topups_pusd"] - audit["spent_pusd"]
    page = (await admin.get("/console/admin/codes")).text
    assert "2 / 3" in page


async def test_an_admin_session_ends_when_the_admin_key_changes(api: Api) -> None:
    admin, _ = await signed_in(api, ADMIN_KEY)
    assert (await admin.get("/console/admin")).status_code == 200
    api.accounts.bootstrap.admin_key = ADMIN_KEY + "-rotated"
    try:
        assert (await admin.get("/console/admin")).status_code == 303
    finally:
        api.accounts.bootstrap.admin_key = ADMIN_KEY


async def test_registration_by_invite_code_with_a_granted_balance(api: Api) -> None:
    from flashserve.api.console.config import ConsoleConfig

    state = api.app.state.console
    c = browser(api)
    token = csrf_in((await c.get("/console/signin")).text)
    assert (await c.get("/console/register")).status_code == 404  # off by default
    assert (await c.post("/console/register", data={"csrf": token, "name": "n", "password": "p" * 10})
            ).status_code == 404
    state.config = ConsoleConfig(registration="invite", invite_code="let-me-in", granted_balance_pusd=250_000_000_000)
    name = "invited-" + str(id(c))
    form = {"csrf": token, "name": name, "password": "long enough pw"}
    assert (await c.post("/console/register", data={**form, "invite_code": "wrong"})).status_code == 403
    assert (await c.post("/console/register", data={**form, "invite_code": "let-me-in", "password": "short"})
            ).status_code == 400
    r = await c.post("/console/register", data={**form, "invite_code": "let-me-in"})
    assert r.status_code == 303 and r.headers["location"] == "/console/keys"
    account = await api.accounts.ledger.account_by_name(name)
    assert account is not None and account["balance_pusd"] == 250_000_000_000
    # Registering signed c in with a new session: the old form's token is void (no fixation), a fresh one works.
    assert (await c.post("/console/register", data={**form, "invite_code": "let-me-in"})).status_code == 403
    form["csrf"] = csrf_in((await c.get("/console/models")).text)
    r = await c.post("/console/register", data={**form, "invite_code": "let-me-in"})
    assert r.status_code == 400 and "taken" in r.text
    # Registration off again: the user still signs in with name and password, and the playground bills them.
    state.config = ConsoleConfig()
    d = browser(api)
    token = csrf_in((await d.get("/console/signin")).text)
    r = await d.post("/console/signin", data={"csrf": token, "name": name, "password": "long enough pw"})
    assert r.status_code == 303
    token = csrf_in((await d.get("/console/playground")).text)
    r = await d.post("/console/api/chat/completions", headers={"x-csrf-token": token},
                     json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    [record] = await api.records(account["id"])
    assert record["request_id"] == r.json()["id"]
    stored = await api.accounts.console_users._row(name)
    assert stored.password_hash.startswith("scrypt$") and "long enough pw" not in stored.password_hash
