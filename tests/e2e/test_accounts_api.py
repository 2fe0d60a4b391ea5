"""End-to-end: accounts, API keys, prices and the usage ledger on the session server.

Prices of deepseek/deepseek-v4-flash, in picodollars (1 USD = 10**12 pUSD) per token: cache hit 2,800,
cache miss 140,000, output 280,000. Every answer states its cost (`x-flashserve-cost-usd` header and
`usage.cost` on non-streaming answers, `usage.cost` on the include_usage chunk of a stream), and the
cost is exactly that formula applied to the usage it reports.

The admin API (/admin/*, admin Bearer key) creates accounts and keys, tops balances up, revokes keys
and reads the ledger; GET /v1/usage shows a key's own account. Every test that checks balances or
records works on an account it creates itself, so the order of the tests and the traffic of the rest
of the suite on the default account do not matter. 401 (bad key), 402 (no balance) and 429 (over a
key's limits) are answered before any work and write no usage row.
(402 and the 429s of RPM and concurrency are tested in-process: tests/api/test_billing.py.)
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Server

MODEL = "deepseek/deepseek-v4-flash"
ALIAS = "smollm2-135m-instruct"
PUSD_PER_USD = 10**12
HIT, MISS, OUT = 2_800, 140_000, 280_000
STATUSES = {"ok", "error", "cancelled", "reaped"}  # reaped: settled after its gateway died
ROW_WAIT_S = 15.0
ACCOUNT_FIELDS = {"id", "name", "balance_pusd", "balance_usd", "created_at"}
KEY_FIELDS = {"id", "prefix", "name", "account_id", "created_at", "expires_at", "revoked_at", "max_concurrent",
              "rpm", "tpm"}
USAGE_FIELDS = {"group", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens",
                "total_tokens", "cache_hit_ratio", "cost_usd", "cost_pusd"}
RECORD_FIELDS = {"request_id", "key_id", "account_id", "model", "prompt_tokens", "cached_tokens",
                 "completion_tokens", "reasoning_tokens", "cost_pusd", "status", "latency_ms", "created_at"}


# ----------------------------------------------------------------------------------------------- helpers


def price(prompt: int, cached: int, completion: int) -> int:
    """The cost in pUSD of one request with this usage."""
    return cached * HIT + (prompt - cached) * MISS + completion * OUT


def usage_price(usage: dict[str, Any]) -> int:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return price(usage["prompt_tokens"], cached, usage["completion_tokens"])


def usd(pusd: int) -> Decimal:
    return Decimal(pusd) / PUSD_PER_USD


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_account(admin: httpx.Client, balance_usd: str | float | None = "1", name: str | None = None) -> dict:
    body: dict[str, Any] = {"name": name or unique("e2e")}
    if balance_usd is not None:
        body["balance_usd"] = balance_usd
    r = admin.post("/admin/accounts", json=body)
    assert r.status_code == 201, r.text
    account = r.json()
    assert set(account) >= ACCOUNT_FIELDS, account
    return account


def create_key(admin: httpx.Client, account_id: str, **limits: Any) -> dict:
    body = {"account_id": account_id, "name": limits.pop("name", unique("key")), "expires_at": None,
            "max_concurrent": None, "rpm": None, "tpm": None, **limits}
    r = admin.post("/admin/keys", json=body)
    assert r.status_code == 201, r.text
    key = r.json()
    assert KEY_FIELDS | {"key"} <= set(key), key
    return key


def get_account(admin: httpx.Client, account_id: str) -> dict:
    r = admin.get(f"/admin/accounts/{account_id}")
    assert r.status_code == 200, r.text
    return r.json()


def records(admin: httpx.Client, account_id: str) -> list[dict]:
    r = admin.get("/admin/usage/records", params={"account_id": account_id, "limit": 1000})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    return body["data"]


def wait_records(admin: httpx.Client, account_id: str, n: int, timeout: float = ROW_WAIT_S) -> list[dict]:
    """The account's records once there are (at least) n of them; the ledger may be written just after the
    response."""
    deadline = time.monotonic() + timeout
    rows = records(admin, account_id)
    while len(rows) < n and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = records(admin, account_id)
    time.sleep(0.3)  # a late extra row would show up now
    rows = records(admin, account_id)
    assert len(rows) == n, f"expected {n} usage rows for {account_id}, found {len(rows)}: {rows}"
    return rows


def check_record(row: dict) -> None:
    assert set(row) >= RECORD_FIELDS, row
    for f in ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost_pusd", "latency_ms"):
        assert isinstance(row[f], int) and not isinstance(row[f], bool) and row[f] >= 0, (f, row)
    assert row["cached_tokens"] <= row["prompt_tokens"], row
    assert row["reasoning_tokens"] <= row["completion_tokens"], row
    assert row["status"] in STATUSES, row
    assert row["cost_pusd"] == price(row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]), row


def chat_body(content: str, max_tokens: int = 2, model: str = MODEL, **kw: Any) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, **kw}


def post_chat(base_url: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=120.0)


def stream_chat(base_url: str, key: str, body: dict) -> tuple[str, dict]:
    """Runs a stream with include_usage to its end; returns the completion id and the usage chunk's usage."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    usage, cid = None, None
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=120.0) as r:
        assert r.status_code == 200, r.read().decode()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            cid = cid or chunk["id"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert usage is not None, "no include_usage chunk"
    return cid, usage


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def check_retry_after(r: httpx.Response) -> None:
    value = r.headers.get("retry-after")
    assert value is not None, f"429 without retry-after: {dict(r.headers)}"
    assert 0 < float(value) <= 61, value


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


def check_cost_header(r: httpx.Response) -> int:
    """Checks the header and usage.cost of a non-streaming answer against the formula; returns the cost."""
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    expected = usage_price(usage)
    header = r.headers.get("x-flashserve-cost-usd")
    assert header is not None, dict(r.headers)
    assert "e" not in header.lower() and not header.startswith("-"), f"not a plain decimal: {header!r}"
    assert Decimal(header) == usd(expected), (header, usage)
    assert isinstance(usage["cost"], int | float) and not isinstance(usage["cost"], bool)
    assert usage["cost"] == pytest.approx(float(usd(expected)), rel=1e-9, abs=1e-18), usage
    return expected


@pytest.fixture(scope="module")
def base(server: Server) -> str:
    return server.base_url


# ------------------------------------------------------------------------------------------------ prices


def test_cost_header_and_usage_cost_follow_the_prices(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat_body("What is the capital of France?", max_tokens=4))
    cost = check_cost_header(r)
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert cost >= usage["prompt_tokens"] * HIT + usage["completion_tokens"] * OUT


def test_stream_usage_chunk_has_the_cost(base: str, api_key: str) -> None:
    _, usage = stream_chat(base, api_key, chat_body("Name a colour.", max_tokens=4))
    expected = usage_price(usage)
    assert "cost" in usage, usage
    assert usage["cost"] == pytest.approx(float(usd(expected)), rel=1e-9, abs=1e-18), usage


def test_the_openai_client_sees_the_cost(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=2)
    cached = r.usage.prompt_tokens_details.cached_tokens or 0
    expected = price(r.usage.prompt_tokens, cached, r.usage.completion_tokens)
    assert r.usage.model_extra["cost"] == pytest.approx(float(usd(expected)), rel=1e-9, abs=1e-18)


def test_cached_prompt_tokens_are_billed_at_the_hit_price(http: httpx.Client) -> None:
    # A nonce in the first 16-token block (an explicit system message replaces the template's default one), so
    # nothing earlier in the session shares the prefix; long enough for several 16-token blocks.
    system = f"[{uuid.uuid4().hex}] " + "The quick brown fox jumps over the lazy dog near the river bank. " * 12
    body = chat_body("How many foxes are there?", max_tokens=2)
    body["messages"].insert(0, {"role": "system", "content": system})
    first = http.post("/v1/chat/completions", json=body)
    second = http.post("/v1/chat/completions", json=body)
    cost1, cost2 = check_cost_header(first), check_cost_header(second)
    u1, u2 = first.json()["usage"], second.json()["usage"]
    assert u1["prompt_tokens"] == u2["prompt_tokens"] > 100
    c1 = u1["prompt_tokens_details"]["cached_tokens"]
    c2 = u2["prompt_tokens_details"]["cached_tokens"]
    assert c1 == 0, u1
    assert c2 >= 64, u2  # the repeated prompt's prefix came from the cache
    assert cost1 - cost2 == c2 * (MISS - HIT) + (u1["completion_tokens"] - u2["completion_tokens"]) * OUT
    if u1["completion_tokens"] == u2["completion_tokens"]:
        assert cost2 < cost1


# ------------------------------------------------------------------------------------ accounts and keys


def test_default_account_holds_the_bootstrap_key(admin: httpx.Client, server: Server, http: httpx.Client) -> None:
    check_cost_header(http.post("/v1/chat/completions", json=chat_body("Hi", max_tokens=1)))  # charged to default
    r = admin.get("/admin/accounts")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    defaults = [a for a in body["data"] if a["name"] == "default"]
    assert len(defaults) == 1, body
    default = defaults[0]
    assert set(default) >= ACCOUNT_FIELDS
    assert Decimal(default["balance_usd"]) == usd(default["balance_pusd"])
    keys = admin.get("/admin/keys", params={"account_id": default["id"]}).json()["data"]
    assert keys and all(k["account_id"] == default["id"] for k in keys)
    assert any(server.api_key.startswith(k["prefix"].rstrip("…").rstrip(".")) for k in keys), keys
    assert server.api_key not in json.dumps(keys)
    if server.process is None:
        return  # an external server: its default balance is not ours to know
    # The session server's default account started at $10 (FLASHSERVE_DEFAULT_BALANCE_USD unset) and nobody
    # tops it up: its balance is 10 USD minus everything its ledger charged, once in-flight requests settle.
    deadline = time.monotonic() + ROW_WAIT_S
    while True:
        rows = admin.get("/admin/usage", params={"account_id": default["id"], "group_by": "day"}).json()["data"]
        charged = sum(g["cost_pusd"] for g in rows)
        balance = get_account(admin, default["id"])["balance_pusd"]
        if balance == 10 * PUSD_PER_USD - charged or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert charged > 0
    assert balance == 10 * PUSD_PER_USD - charged


def test_create_get_list_and_top_up_accounts(admin: httpx.Client) -> None:
    a = create_account(admin, "2.5")
    assert a["balance_pusd"] == 2_500_000_000_000 and Decimal(a["balance_usd"]) == Decimal("2.5")
    datetime.fromisoformat(a["created_at"])
    b = create_account(admin, 1.25)
    assert b["balance_pusd"] == 1_250_000_000_000
    c = create_account(admin, None)
    assert c["balance_pusd"] == 0 and Decimal(c["balance_usd"]) == 0
    assert len({a["id"], b["id"], c["id"]}) == 3

    assert get_account(admin, a["id"]) == a
    listed = admin.get("/admin/accounts").json()
    assert listed["object"] == "list"
    ids = {x["id"] for x in listed["data"]}
    assert {a["id"], b["id"], c["id"]} <= ids

    r = admin.post(f"/admin/accounts/{a['id']}/top-up", json={"amount_usd": "5"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == a["id"] and r.json()["balance_pusd"] == 7_500_000_000_000
    r = admin.post(f"/admin/accounts/{a['id']}/top-up", json={"amount_usd": "0.000001"})
    assert r.json()["balance_pusd"] == 7_500_001_000_000
    assert Decimal(r.json()["balance_usd"]) == Decimal("7.500001")
    assert get_account(admin, a["id"])["balance_pusd"] == 7_500_001_000_000

    assert admin.get(f"/admin/accounts/{unique('nope')}").status_code == 404
    assert admin.post(f"/admin/accounts/{unique('nope')}/top-up", json={"amount_usd": "1"}).status_code == 404


def test_new_key_works_and_is_shown_only_once(admin: httpx.Client, base: str) -> None:
    account = create_account(admin, "1")
    key = create_key(admin, account["id"], name="laptop", rpm=100, tpm=100000, max_concurrent=4)
    secret = key["key"]
    assert secret.startswith("sk-fs-") and len(secret) >= 32
    assert secret.startswith(key["prefix"].rstrip("…").rstrip(".")) and len(key["prefix"].rstrip("…")) < len(secret)
    assert key["account_id"] == account["id"] and key["name"] == "laptop"
    assert (key["rpm"], key["tpm"], key["max_concurrent"]) == (100, 100000, 4)
    assert key["revoked_at"] is None and key["expires_at"] is None

    listed = admin.get("/admin/keys", params={"account_id": account["id"]})
    assert listed.status_code == 200, listed.text
    assert listed.json()["object"] == "list"
    [entry] = listed.json()["data"]
    assert "key" not in entry and secret not in listed.text
    assert entry["id"] == key["id"] and entry["prefix"] == key["prefix"]
    assert secret not in admin.get("/admin/keys").text

    with openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0, timeout=120.0) as c:
        assert MODEL in {m.id for m in c.models.list()}
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=2)
    [row] = wait_records(admin, account["id"], 1)
    check_record(row)
    assert row["key_id"] == key["id"] and row["account_id"] == account["id"] and row["status"] == "ok"
    assert row["request_id"] == r.id
    assert (row["prompt_tokens"], row["completion_tokens"]) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    assert get_account(admin, account["id"])["balance_pusd"] == PUSD_PER_USD - row["cost_pusd"]


def test_key_for_an_unknown_account_is_refused(admin: httpx.Client) -> None:
    r = admin.post("/admin/keys", json={"account_id": unique("nope"), "name": "x"})
    assert r.status_code in (400, 404), r.text


def test_revoked_key_is_401_and_writes_no_row(admin: httpx.Client, base: str) -> None:
    account = create_account(admin, "1")
    key = create_key(admin, account["id"])
    assert post_chat(base, key["key"], chat_body("Hi", max_tokens=1)).status_code == 200
    wait_records(admin, account["id"], 1)

    r = admin.post(f"/admin/keys/{key['id']}/revoke")
    assert r.status_code == 200, r.text
    revoked = r.json()
    assert revoked["id"] == key["id"] and revoked["revoked_at"] is not None and "key" not in revoked
    datetime.fromisoformat(revoked["revoked_at"])
    [entry] = admin.get("/admin/keys", params={"account_id": account["id"]}).json()["data"]
    assert entry["revoked_at"] is not None

    error_of(post_chat(base, key["key"], chat_body("Hi", max_tokens=1)), 401, "invalid_api_key")
    r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key['key']}"})
    error_of(r, 401, "invalid_api_key")
    with openai.OpenAI(base_url=f"{base}/v1", api_key=key["key"], max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    wait_records(admin, account["id"], 1)
    assert admin.post(f"/admin/keys/{unique('nope')}/revoke").status_code == 404


def test_expired_key_is_401(admin: httpx.Client, base: str) -> None:
    account = create_account(admin, "1")
    expires = datetime.now(UTC) + timedelta(seconds=3)
    key = create_key(admin, account["id"], expires_at=iso(expires))
    assert abs((datetime.fromisoformat(key["expires_at"]) - expires).total_seconds()) < 1, key
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert httpx.get(f"{base}/v1/models", headers=headers).status_code == 200
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.5)
    error_of(httpx.get(f"{base}/v1/models", headers=headers), 401, "invalid_api_key")
    error_of(post_chat(base, key["key"], chat_body("Hi", max_tokens=1)), 401, "invalid_api_key")
    assert records(admin, account["id"]) == []


def test_a_balance_that_cannot_pay_the_prompt_is_402_and_never_goes_below_zero(admin: httpx.Client,
                                                                              base: str) -> None:
    """Reserved balances (issue 18): one picodollar cannot pay for the prompt and one token, so the request
    is refused before any model work (it used to run and take the balance below zero); with enough for the
    prompt and a few tokens, max_tokens is clamped to what the balance pays and the balance ends at >= 0."""
    account = create_account(admin, "0.000000000001")
    assert account["balance_pusd"] == 1
    key = create_key(admin, account["id"])
    error_of(post_chat(base, key["key"], chat_body("Hi", max_tokens=1)), 402, "insufficient_balance")
    assert records(admin, account["id"]) == [] and get_account(admin, account["id"])["balance_pusd"] == 1
    r = admin.post(f"/admin/accounts/{account['id']}/top-up", json={"amount_usd": "0.00001"})
    assert r.status_code == 200, r.text
    r = post_chat(base, key["key"], chat_body("Hi", max_tokens=300))
    cost = check_cost_header(r)
    assert int(r.headers["x-flashserve-max-tokens-clamped"]) < 300
    assert r.json()["usage"]["completion_tokens"] <= int(r.headers["x-flashserve-max-tokens-clamped"])
    wait_records(admin, account["id"], 1)
    after = get_account(admin, account["id"])
    assert after["balance_pusd"] == 1 + 10_000_000 - cost >= 0
    assert usd(after["balance_pusd"]) == Decimal(after["balance_usd"])


# ----------------------------------------------------------------------------------------- rate limits


def test_tpm_limit_is_429_once_the_minute_s_tokens_are_spent(admin: httpx.Client, http: httpx.Client,
                                                              base: str) -> None:
    prompt = "Tell me about the weather in Paris in spring, briefly."
    probe = http.post("/v1/chat/completions", json=chat_body(prompt, max_tokens=2)).json()["usage"]
    per_request = probe["prompt_tokens"] + 2
    # room for one request (even if the server counts its max_tokens in advance) but not for three
    tpm = per_request + 8
    account = create_account(admin, "1")
    key = create_key(admin, account["id"], tpm=tpm)
    used, outcomes = 0, []
    for _ in range(3):
        r = post_chat(base, key["key"], chat_body(prompt, max_tokens=2))
        outcomes.append(r.status_code)
        if r.status_code != 200:
            break
        used += r.json()["usage"]["total_tokens"]
    assert outcomes[0] == 200, outcomes
    assert outcomes[-1] == 429, f"{outcomes}: {used} tokens used against tpm={tpm}"
    error_of(r, 429, "rate_limit_exceeded")
    check_retry_after(r)
    wait_records(admin, account["id"], outcomes.count(200))


# ------------------------------------------------------------------------------------------------ ledger


def test_balance_is_initial_plus_top_ups_minus_recorded_costs(admin: httpx.Client, base: str) -> None:
    account = create_account(admin, "0.5")
    key = create_key(admin, account["id"])
    assert admin.post(f"/admin/accounts/{account['id']}/top-up", json={"amount_usd": "0.25"}).status_code == 200
    answers: dict[str, dict] = {}
    for i in range(4):
        r = post_chat(base, key["key"], chat_body(f"Count to {i + 2}.", max_tokens=1 + i))
        check_cost_header(r)
        answers[r.json()["id"]] = r.json()["usage"]
    for i in range(2):
        cid, usage = stream_chat(base, key["key"], chat_body(f"Name {i + 2} fruits.", max_tokens=3))
        answers[cid] = usage
    rows = wait_records(admin, account["id"], 6)
    for row in rows:
        check_record(row)
        assert row["status"] == "ok" and row["account_id"] == account["id"] and row["key_id"] == key["id"]
        assert row["model"] == MODEL
    assert {row["request_id"] for row in rows} == set(answers)
    for row in rows:
        usage = answers[row["request_id"]]
        assert row["prompt_tokens"] == usage["prompt_tokens"]
        assert row["completion_tokens"] == usage["completion_tokens"]
        assert row["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
        assert row["cost_pusd"] == usage_price(usage)
    stamps = [datetime.fromisoformat(row["created_at"]) for row in rows]
    assert stamps == sorted(stamps, reverse=True), "records are listed newest first"
    limited = admin.get("/admin/usage/records", params={"account_id": account["id"], "limit": 2}).json()["data"]
    assert [x["request_id"] for x in limited] == [x["request_id"] for x in rows[:2]]

    after = get_account(admin, account["id"])
    assert after["balance_pusd"] == 750_000_000_000 - sum(row["cost_pusd"] for row in rows)
    assert Decimal(after["balance_usd"]) == usd(after["balance_pusd"])


def test_v1_usage_groups_by_key_model_and_day(admin: httpx.Client, base: str) -> None:
    account = create_account(admin, "1")
    k1, k2 = create_key(admin, account["id"]), create_key(admin, account["id"])
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=2)
    assert post_chat(base, k1["key"], chat_body("Say yes.", max_tokens=2)).status_code == 200
    stream_chat(base, k1["key"], chat_body("Say no.", max_tokens=3))
    assert post_chat(base, k2["key"], chat_body("Say maybe.", max_tokens=2, model=ALIAS)).status_code == 200
    rows = wait_records(admin, account["id"], 3)
    t1 = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)

    def usage(key: dict, **params: Any) -> dict:
        r = httpx.get(f"{base}/v1/usage", params=params, headers={"Authorization": f"Bearer {key['key']}"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list"
        for g in body["data"]:
            assert set(g) >= USAGE_FIELDS, g
            assert g["total_tokens"] == g["prompt_tokens"] + g["completion_tokens"]
            ratio = g["cached_tokens"] / g["prompt_tokens"] if g["prompt_tokens"] else 0
            assert g["cache_hit_ratio"] == pytest.approx(ratio, abs=1e-6)  # rounding for display is fine
            assert Decimal(g["cost_usd"]) == usd(g["cost_pusd"])
        return body

    def expected(key_of) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for row in rows:
            g = out.setdefault(key_of(row), {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0,
                                             "completion_tokens": 0, "reasoning_tokens": 0, "cost_pusd": 0})
            g["requests"] += 1
            for f in ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost_pusd"):
                g[f] += row[f]
        return out

    def groups(body: dict) -> dict[str, dict[str, int]]:
        return {g["group"]: {f: g[f] for f in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens",
                                                "reasoning_tokens", "cost_pusd")} for g in body["data"]}

    def day(row: dict) -> str:
        return datetime.fromisoformat(row["created_at"]).astimezone(UTC).date().isoformat()

    by_day = expected(day)
    default = usage(k2)  # either key sees the whole account, grouped by day
    assert default["group_by"] == "day"
    assert groups(default) == by_day
    assert groups(usage(k1, group_by="day")) == by_day
    assert groups(usage(k1, group_by="key")) == expected(lambda row: row["key_id"])
    assert set(groups(usage(k1, group_by="key"))) == {k1["id"], k2["id"]}
    assert groups(usage(k1, group_by="key"))[k1["id"]]["requests"] == 2
    by_model = groups(usage(k1, group_by="model"))
    assert by_model == expected(lambda row: row["model"])
    assert MODEL in by_model and len(by_model) == 2
    assert sum(g["cost_pusd"] for g in by_model.values()) == sum(row["cost_pusd"] for row in rows)

    # time windows: ISO datetimes, unix seconds, dates
    assert groups(usage(k1, group_by="key", **{"from": iso(t0), "to": iso(t1)})) == expected(lambda r: r["key_id"])
    assert groups(usage(k1, **{"from": str(int(t0.timestamp())), "to": str(int(t1.timestamp()))})) == by_day
    assert groups(usage(k1, **{"from": t0.date().isoformat()})) == by_day
    assert usage(k1, **{"from": iso(t1 + timedelta(hours=1))})["data"] == []
    assert usage(k1, **{"to": iso(t0 - timedelta(hours=1))})["data"] == []
    assert usage(k1, **{"from": str(int(t1.timestamp()) + 3600)})["data"] == []

    for bad in ({"group_by": "week"}, {"from": "yesterday-ish"}, {"to": "2024-13-45"}):
        r = httpx.get(f"{base}/v1/usage", params=bad, headers={"Authorization": f"Bearer {k1['key']}"})
        error_of(r, 400)
    error_of(httpx.get(f"{base}/v1/usage"), 401)

    # the admin view of the same account agrees; the admin view of everyone includes it
    for group_by in ("key", "model", "day"):
        r = admin.get("/admin/usage", params={"account_id": account["id"], "group_by": group_by})
        assert r.status_code == 200, r.text
        assert groups(r.json()) == groups(usage(k1, group_by=group_by))
    everyone = admin.get("/admin/usage", params={"group_by": "key"})
    assert everyone.status_code == 200
    assert {k1["id"], k2["id"]} <= set(groups(everyone.json()))
    assert sum(g["requests"] for g in everyone.json()["data"]) > 3


def test_v1_usage_of_a_fresh_account_is_empty(admin: httpx.Client, base: str) -> None:
    account = create_account(admin, "1")
    key = create_key(admin, account["id"])
    r = httpx.get(f"{base}/v1/usage", headers={"Authorization": f"Bearer {key['key']}"})
    assert r.status_code == 200, r.text
    assert r.json()["data"] == []


# ------------------------------------------------------------------------------------------------- admin


@pytest.mark.parametrize("path", ["/admin/accounts", "/admin/keys", "/admin/usage", "/admin/usage/records"])
def test_admin_refuses_api_keys_and_no_key(base: str, api_key: str, path: str) -> None:
    assert httpx.get(f"{base}{path}").status_code == 401
    assert httpx.get(f"{base}{path}", headers={"Authorization": "Bearer sk-fs-not-an-admin-key"}).status_code == 401
    assert httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {api_key}"}).status_code in (401, 403)


def test_admin_writes_refuse_api_keys(admin: httpx.Client, base: str, api_key: str) -> None:
    account = create_account(admin, "0")
    for headers in ({}, {"Authorization": f"Bearer {api_key}"}):
        r = httpx.post(f"{base}/admin/accounts", json={"name": unique("x")}, headers=headers)
        assert r.status_code in (401, 403), r.text
        r = httpx.post(f"{base}/admin/accounts/{account['id']}/top-up", json={"amount_usd": "100"}, headers=headers)
        assert r.status_code in (401, 403), r.text
        r = httpx.post(f"{base}/admin/keys", json={"account_id": account["id"], "name": "x"}, headers=headers)
        assert r.status_code in (401, 403), r.text
    assert get_account(admin, account["id"])["balance_pusd"] == 0
    assert admin.get("/admin/keys", params={"account_id": account["id"]}).json()["data"] == []


def test_admin_key_is_not_an_api_key(base: str, server: Server) -> None:
    if server.admin_key is None:
        pytest.skip("no admin key")
    r = post_chat(base, server.admin_key, chat_body("Hi", max_tokens=1))
    error_of(r, 401, "invalid_api_key")


def test_admin_rejects_bad_bodies(admin: httpx.Client) -> None:
    assert admin.post("/admin/accounts", json={}).status_code == 400
    assert admin.post("/admin/accounts", json={"name": unique("x"), "balance_usd": "lots"}).status_code == 400
    account = create_account(admin, "1")
    r = admin.post(f"/admin/accounts/{account['id']}/top-up", json={"amount_usd": "abc"})
    assert r.status_code == 400, r.text
    r = admin.post("/admin/keys", json={"account_id": account["id"], "name": "x", "rpm": -1})
    assert r.status_code == 400, r.text
    assert get_account(admin, account["id"])["balance_pusd"] == PUSD_PER_USD
