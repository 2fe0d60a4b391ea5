"""The console in a real browser (Chromium via Playwright) against a real `flashserve serve`: sign-in, the
playground streaming from the embedded model and billing exactly what the ledger records, keys made in
the console and used by the `openai` client, sanitized model output, CSRF, account isolation, the admin
pages and top-up codes. Each page is photographed for docs/console/ (see conftest.py)."""

from __future__ import annotations

import re
import uuid

import httpx
import openai
import pytest

from tests.browser.conftest import MONEY, XSS_MODEL, Console, csrf_of, shoot, sign_in

MODEL = "deepseek/deepseek-v4-flash"
OUTPUT_HAS = "(text) => document.querySelector('[data-testid=playground-output]').textContent.includes(text)"
COST_SHOWN = "() => /^\\$[0-9.]+$/.test(document.querySelector('[data-testid=playground-cost]').textContent)"
WATCH_OUTPUT = """() => {
    window.__seen = new Set();
    const out = document.querySelector('[data-testid=playground-output]');
    new MutationObserver(() => window.__seen.add(out.textContent))
        .observe(out, {childList: true, subtree: true, characterData: true});
}"""
READABLE_STORAGE = ("() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage), "
                    "document.cookie])")


def _openai(console: Console, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{console.base}/v1", api_key=key, max_retries=0, timeout=120)


def test_root_redirects_and_model_page_agrees_with_the_api(console: Console, new_page) -> None:  # noqa: ANN001
    page = new_page()
    page.goto("/")
    assert page.url.rstrip("/").endswith("/console")
    assert page.get_by_test_id("model-card").count() >= 2
    shoot(page, console, "models")
    page.goto(f"/console/models/{MODEL}")
    api = httpx.get(f"{console.base}/v1/models/{MODEL}", headers={"Authorization": f"Bearer {console.api_key}"}).json()
    pricing = api["pricing"]
    assert page.get_by_test_id("model-price-cache-hit").inner_text() == pricing["input_cache_hit_per_million_usd"]
    assert page.get_by_test_id("model-price-cache-miss").inner_text() == pricing["input_cache_miss_per_million_usd"]
    assert page.get_by_test_id("model-price-output").inner_text() == pricing["output_per_million_usd"]
    assert console.base + "/v1" in page.get_by_test_id("example-curl").inner_text()
    assert page.get_by_test_id("model-json").inner_text().strip().startswith("{")
    shoot(page, console, "model")
    assert page.errors == []


def test_security_headers(console: Console) -> None:
    r = httpx.get(f"{console.base}/console/signin")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_sign_in_playground_streams_paris_and_cost_is_the_ledgers(console: Console, new_page) -> None:  # noqa: ANN001
    page = new_page()
    page.goto("/console/signin")
    shoot(page, console, "signin")
    sign_in(page, console.api_key)
    assert page.get_by_test_id("sign-out").is_visible()
    # The key is in no storage the page can read, nor in the URL.
    storage = page.evaluate(READABLE_STORAGE)
    assert console.api_key not in storage and console.api_key not in page.url
    page.goto("/console/playground")
    page.get_by_test_id("playground-model").select_option(MODEL)
    page.get_by_test_id("playground-temperature").fill("0")
    page.get_by_test_id("playground-max-tokens").fill("32")
    page.get_by_test_id("playground-input").fill("What is the capital of France?")
    # Record how the output grows: a streamed answer is seen in more than one state.
    page.evaluate(WATCH_OUTPUT)
    page.get_by_test_id("playground-send").click()
    page.wait_for_function(OUTPUT_HAS, arg="Paris", timeout=120_000)
    page.wait_for_function(COST_SHOWN, timeout=60_000)
    assert page.evaluate("() => window.__seen.size") >= 2, "the answer did not stream in"
    cost = page.get_by_test_id("playground-cost").inner_text()
    request_id = page.get_by_test_id("playground-cost").get_attribute("data-request-id")
    assert MONEY.match(cost) and request_id
    assert "prompt" in page.get_by_test_id("playground-stats").inner_text()
    shoot(page, console, "playground")
    page.goto("/console/usage")
    row = page.locator(f'[data-testid=usage-table] tr[data-request-id="{request_id}"]')
    assert row.locator("[data-testid=usage-row-cost]").inner_text() == cost
    # The same row as the admin API sees it: the cost shown is the billed cost.
    with console.admin() as admin:
        records = admin.get("/admin/usage/records", params={"limit": 50}).json()["data"]
    billed = next(r for r in records if r["request_id"] == request_id)
    assert cost == f"${billed['cost_usd']}" and billed["status"] == "ok"
    assert page.get_by_test_id("usage-chart").locator("canvas").count() >= 1
    shoot(page, console, "usage")
    assert page.errors == []


def test_create_key_use_it_see_it_revoke_it(console: Console, new_page) -> None:  # noqa: ANN001
    _, key = console.new_account(f"keys-{uuid.uuid4().hex[:6]}")
    page = new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    sign_in(page, key)
    page.goto("/console/keys")
    page.get_by_test_id("key-name").fill("from-the-console")
    page.get_by_test_id("keys-create").click()
    new_key = page.get_by_test_id("new-key-value").inner_text().strip()
    assert new_key.startswith("sk-fs-")
    shoot(page, console, "keys")
    client = _openai(console, new_key)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    page.goto("/console/usage")
    assert "from-the-console" in page.get_by_test_id("usage-table").inner_text()
    assert page.locator("[data-testid=usage-table] tr[data-request-id]").count() >= 1
    assert reply.id
    page.goto("/console/keys")
    row = page.locator("[data-testid=keys-table] tr", has_text="from-the-console")
    assert "1 req" in row.inner_text()
    row.get_by_test_id("key-revoke").click()
    page.wait_for_load_state()
    assert "revoked" in page.locator("[data-testid=keys-table] tr", has_text="from-the-console").inner_text()
    with pytest.raises(openai.AuthenticationError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert exc.value.status_code == 401
    assert page.errors == []


def test_model_output_is_sanitized(console: Console, new_page) -> None:  # noqa: ANN001
    page = new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    sign_in(page, console.api_key)
    page.goto("/console/playground")
    page.get_by_test_id("playground-model").select_option(XSS_MODEL)
    page.get_by_test_id("playground-input").fill("Show me some HTML")
    page.get_by_test_id("playground-send").click()
    page.wait_for_function(OUTPUT_HAS, arg="SAFE-END", timeout=60_000)
    output = page.get_by_test_id("playground-output")
    assert output.locator("strong").inner_text() == "bold text"  # Markdown is rendered...
    html = output.inner_html()
    assert "<script" not in html and "onerror" not in html and "javascript:" not in html and "<iframe" not in html
    for link in output.locator("a").all():  # ...links survive, without their javascript: target
        link.click()
    assert page.evaluate("() => window.__xss") is None
    assert dialogs == []
    assert page.get_by_test_id("playground-reasoning").is_visible()
    assert "markup" in page.get_by_test_id("playground-reasoning").inner_text()  # reasoning shown apart, as text
    # Chromium reports a CSP refusal when DOMPurify parses the hostile HTML in its inert document (nothing runs
    # there even without a CSP); those reports are the CSP doing its job. The reply's <img src="x">, stripped
    # of its handler, loads and 404s. Nothing else may go wrong.
    assert [e for e in page.errors if "Content Security Policy" not in e and "404" not in e] == []


def test_playground_tools_json_mode_and_view_code(console: Console, new_page) -> None:  # noqa: ANN001
    page = new_page()
    sign_in(page, console.api_key)
    page.goto(f"/console/playground?model={XSS_MODEL}")
    assert page.get_by_test_id("playground-model").input_value() == XSS_MODEL
    page.get_by_test_id("playground-tools").fill('[{"type": "function", "function": {"name": "get_weather", '
                                                  '"parameters": {"type": "object", "properties": {"city": '
                                                  '{"type": "string"}}, "required": ["city"]}}}]')
    page.get_by_test_id("playground-input").fill("Weather in Paris?")
    page.get_by_test_id("playground-send").click()
    calls = page.get_by_test_id("playground-tool-calls")
    calls.locator("pre").first.wait_for(timeout=60_000)
    assert "get_weather" in calls.inner_text() and '"city"' in calls.inner_text()
    page.wait_for_function(COST_SHOWN, timeout=60_000)
    # A bad tools editor is caught before anything is sent.
    page.get_by_test_id("playground-tools").fill("[not json")
    page.get_by_test_id("playground-input").fill("again")
    page.get_by_test_id("playground-send").click()
    assert page.locator("#pg-settings-error").is_visible()
    page.get_by_test_id("playground-tools").fill("")
    page.get_by_test_id("playground-format").select_option("json_object")
    page.get_by_test_id("playground-view-code").click()
    curl = page.get_by_test_id("playground-code-curl").inner_text()
    assert f"{console.base}/v1/chat/completions" in curl and XSS_MODEL in curl and "json_object" in curl
    assert console.api_key not in curl and "$FLASHSERVE_API_KEY" in curl
    assert page.errors == []


def test_csrf_is_required(console: Console, new_page) -> None:  # noqa: ANN001
    page = new_page()
    sign_in(page, console.api_key)
    page.goto("/console/keys")
    token = csrf_of(page)
    without = page.request.post(f"{console.base}/console/keys", form={"name": "csrf-less"})
    wrong = page.request.post(f"{console.base}/console/keys", form={"name": "csrf-wrong", "csrf": token[:-2] + "xx"})
    chat = page.request.post(f"{console.base}/console/api/chat/completions",
                             data={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert (without.status, wrong.status, chat.status) == (403, 403, 403)
    assert chat.json()["error"]["code"] == "csrf_failed"
    page.reload()
    assert "csrf-less" not in page.get_by_test_id("keys-table").inner_text()
    ok = page.request.post(f"{console.base}/console/keys", form={"name": "csrf-ok", "csrf": token})
    assert ok.status == 201


def test_accounts_are_isolated(console: Console, new_page) -> None:  # noqa: ANN001
    _, key_a = console.new_account(f"iso-a-{uuid.uuid4().hex[:6]}")
    _, key_b = console.new_account(f"iso-b-{uuid.uuid4().hex[:6]}")
    a_reply = _openai(console, key_a).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "secret of A"}], max_tokens=3)
    page_a = new_page()
    sign_in(page_a, key_a)
    page_a.goto("/console/keys")
    a_key_id = page_a.locator("[data-testid=keys-table] tr[data-key-id]").first.get_attribute("data-key-id")
    page_a.goto("/console/usage")
    assert page_a.locator(f'tr[data-request-id="{a_reply.id}"]').count() == 1

    page_b = new_page()
    sign_in(page_b, key_b)
    page_b.goto("/console/keys")
    assert page_b.locator(f'tr[data-key-id="{a_key_id}"]').count() == 0
    page_b.goto("/console/usage")
    assert a_reply.id not in page_b.content()
    assert page_b.request.get(f"{console.base}/console/api/requests/{a_reply.id}").status == 404
    csv = page_b.request.get(f"{console.base}/console/usage.csv").text()
    assert a_reply.id not in csv
    # B cannot revoke A's key, even with B's own valid CSRF token.
    r = page_b.request.post(f"{console.base}/console/keys/{a_key_id}/revoke", form={"csrf": csrf_of(page_b)})
    assert r.status == 404
    assert _openai(console, key_a).models.list().data  # A's key still works
    # Nor do B's pages open the admin's.
    page_b.goto("/console/admin")
    assert "/console/signin" in page_b.url


def test_admin_pages(console: Console, new_page) -> None:  # noqa: ANN001
    page = new_page()
    sign_in(page, console.admin_key)
    assert page.url.endswith("/console/admin")
    name = f"made-in-console-{uuid.uuid4().hex[:6]}"
    page.get_by_test_id("admin-account-name").fill(name)
    page.get_by_test_id("admin-account-balance").fill("2.5")
    page.get_by_test_id("admin-account-create").click()
    assert name in page.get_by_test_id("notice").inner_text()
    shoot(page, console, "admin-accounts")
    page.get_by_role("link", name=name).click()
    assert page.get_by_test_id("admin-balance").inner_text() == "$2.5"
    page.get_by_test_id("admin-topup-amount").fill("1.25")
    page.get_by_test_id("admin-topup").click()
    assert page.get_by_test_id("admin-balance").inner_text() == "$3.75"
    assert "balance = credits − usage − held" in page.get_by_test_id("admin-audit").inner_text()
    assert "admin top-up" in page.get_by_test_id("admin-credits").inner_text()
    shoot(page, console, "admin-account")
    page.goto("/console/admin/keys")
    assert "bootstrap" in page.get_by_test_id("admin-keys-table").inner_text()
    page.goto("/console/admin/usage")
    assert page.get_by_test_id("usage-table").locator("tr[data-request-id]").count() >= 1
    shoot(page, console, "admin-usage")
    page.goto("/console/admin/engine")
    with console.admin() as admin:
        report = admin.get("/admin/engine").json()
    for model_id in report["models"]:
        assert page.locator(f'[data-testid=engine-models] [data-model="{model_id}"]').count() == 1
    shoot(page, console, "admin-engine")
    assert page.errors == []


def test_top_up_code_redeems_once(console: Console, new_page) -> None:  # noqa: ANN001
    admin = new_page()
    sign_in(admin, console.admin_key)
    admin.goto("/console/admin/codes")
    admin.get_by_test_id("codes-count").fill("2")
    admin.get_by_test_id("codes-amount").fill("0.75")
    admin.get_by_test_id("codes-create").click()
    codes = admin.get_by_test_id("new-codes-list").inner_text().split()
    assert len(codes) == 2 and all(c.startswith("fs-topup-") for c in codes)
    shoot(admin, console, "admin-codes")

    account, key = console.new_account(f"redeem-{uuid.uuid4().hex[:6]}", balance_usd="1")
    user = new_page()
    sign_in(user, key)
    user.goto("/console/usage")
    assert user.get_by_test_id("balance").inner_text() == "$1"
    user.get_by_test_id("redeem-code").fill(codes[0])
    user.get_by_test_id("redeem").click()
    assert "$0.75" in user.get_by_test_id("notice").inner_text()
    assert user.get_by_test_id("balance").inner_text() == "$1.75"
    user.get_by_test_id("redeem-code").fill(codes[0])
    user.get_by_test_id("redeem").click()
    assert "already been redeemed" in user.get_by_test_id("error").inner_text()
    assert user.get_by_test_id("balance").inner_text() == "$1.75"
    with console.admin() as api:
        audit = api.get(f"/admin/accounts/{account}/audit").json()
    assert audit["balance_pusd"] == audit["topups_pusd"] - audit["spent_pusd"] == 1_750_000_000_000
    admin.goto("/console/admin/codes")
    assert "1 / 2" in admin.get_by_test_id("codes-batches").inner_text()


def test_register_with_password_then_sign_in(console: Console, new_page) -> None:  # noqa: ANN001
    name = f"self-{uuid.uuid4().hex[:6]}"
    page = new_page()
    page.goto("/console/register")
    page.get_by_test_id("register-name").fill(name)
    page.get_by_test_id("register-password").fill("correct horse battery")
    page.get_by_test_id("register").click()
    assert page.url.endswith("/console/keys")
    page.get_by_test_id("sign-out").click()
    page.goto("/console/keys")
    assert "/console/signin" in page.url  # signed out: the session is gone
    page.get_by_test_id("signin-name").fill(name)
    page.get_by_test_id("signin-password").fill("wrong password!")
    page.get_by_test_id("sign-in-password").click()
    assert page.get_by_test_id("signin-error").is_visible()
    page.get_by_test_id("signin-name").fill(name)
    page.get_by_test_id("signin-password").fill("correct horse battery")
    page.get_by_test_id("sign-in-password").click()
    page.goto("/console/usage")
    assert page.get_by_test_id("balance").inner_text() == "$0.5"  # the granted starting balance


def test_phone_width_and_dark_theme(console: Console, new_page) -> None:  # noqa: ANN001
    page = new_page(width=390, height=844, scheme="dark")
    sign_in(page, console.api_key)
    page.goto("/console/playground")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width ({width}px)"
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert re.match(r"rgb\((\d+), (\d+), (\d+)\)", background) and sum(
        int(x) for x in re.findall(r"\d+", background)[:3]) < 150, background
    shoot(page, console, "playground-phone-dark")
    page.goto("/console/keys")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
