"""The browser tier: Playwright drives Debian's Chromium (`/usr/bin/chromium`; Playwright's own browser
download is not reachable here) against ONE real `flashserve serve` process for the whole session.

That server serves the embedded model (the playground's "Paris" test) and, through its catalog, a model
`scripted/xss` played by the scripted raw-V4 upstream (`tests/e2e/scripted_v4_upstream.py`), whose answer
is hostile Markdown/HTML: the sanitization test. Registration with a password is open on it.

Not part of `make test` (`pytest -q` skips this folder: `tests/conftest.py: pytest_ignore_collect`); run it with
`make test-browser`. Screenshots go to `$FLASHSERVE_SCREENSHOTS` when set (`make console-screenshots`
sets it to docs/console/), else to a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import tests.e2e.conftest as e2e
from tests.e2e.conftest import REPO, _free_port, _python, _stop, _wait_ready, start_server
from tests.e2e.scripted import _wait_upstream

CHROMIUM = os.environ.get("FLASHSERVE_CHROMIUM", "/usr/bin/chromium")
API_KEY = "sk-flashserve-browser-0123456789abcdef"
ADMIN_KEY = "sk-flashserve-browser-admin-0123456789abcdef"
XSS_MODEL = "scripted/xss"
# What the hostile model answers: each line would run script if rendered unsanitized.
XSS_REPLY = ("Here you go: **bold text**\n\n<script>window.__xss = 'script'</script>\n\n"
             "<img src=\"x\" onerror=\"window.__xss = 'img'\">\n\n"
             "[click me](javascript:window.__xss='link') and <a href=\"javascript:window.__xss='a'\">this</a>\n\n"
             "<svg><script>window.__xss='svg'</script></svg>\n\n"
             "<iframe src=\"javascript:window.__xss='iframe'\"></iframe>\n\n"
             "SAFE-END")


@dataclass(frozen=True)
class Console:
    base: str
    api_key: str
    admin_key: str
    shots: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=60)

    def new_account(self, name: str, balance_usd: str = "5") -> tuple[str, str]:
        """A fresh account and one key for it, made through the admin API; returns (account id, key)."""
        with self.admin() as admin:
            r = admin.post("/admin/accounts", json={"name": name, "balance_usd": balance_usd})
            assert r.status_code == 201, r.text
            account = r.json()["id"]
            r = admin.post("/admin/keys", json={"account_id": account, "name": f"{name}-key"})
            assert r.status_code == 201, r.text
            return account, r.json()["key"]


@pytest.fixture(scope="session")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    folder = tmp_path_factory.mktemp("browser")
    script = folder / "script.json"
    script.write_text(json.dumps({
        "no_tools": {"reasoning": "The user wants <b>markup</b>. I will answer.", "content": XSS_REPLY},
        "user": {"reasoning": "I will call the tool.", "content": ""},
        "tool": {"reasoning": "Done.", "content": "Done."},
        "chunk_chars": 7}))
    upstream_url = f"http://127.0.0.1:{_free_port()}"
    upstream = subprocess.Popen([_python(), "tests/e2e/scripted_v4_upstream.py", "--port",
                                 upstream_url.rsplit(":", 1)[1], "--script", str(script)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    catalog = folder / "catalog.toml"
    catalog.write_text(f'''
[models."{XSS_MODEL}"]
context_length = 65536
reasoning = true

[models."{XSS_MODEL}".backend]
type = "remote"
url = "{upstream_url}/v1"
model = "deepseek-v4-flash"
kind = "vllm"
raw_text = "deepseek_v4"
''')
    shots = Path(os.environ.get("FLASHSERVE_SCREENSHOTS") or folder / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    try:
        _wait_upstream(upstream_url)
        process, base, log = start_server(tmp_path_factory, {
            "FLASHSERVE_API_KEY": API_KEY, "FLASHSERVE_ADMIN_KEY": ADMIN_KEY, "FLASHSERVE_CATALOG": str(catalog),
            "FLASHSERVE_CONSOLE_REGISTRATION": "open", "FLASHSERVE_CONSOLE_GRANTED_BALANCE_USD": "0.5",
        }, unset=("FLASHSERVE_DATABASE_URL", "FLASHSERVE_DEFAULT_BALANCE_USD"))
        try:
            # Loading the model on a busy CI machine can take minutes: more patience than the e2e default.
            e2e.STARTUP_TIMEOUT_S = max(e2e.STARTUP_TIMEOUT_S, 420.0)
            _wait_ready(base, process, log)
            yield Console(base, API_KEY, ADMIN_KEY, shots)
        finally:
            _stop(process, log)
    finally:
        upstream.kill()
        upstream.wait(timeout=10)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def new_page(browser, console: Console):  # noqa: ANN001, ANN201 - playwright objects
    """A page in a fresh browser context (its own cookies: one visitor), failing the test on any page error
    or console error (a CSP violation included)."""
    contexts = []

    def make(width: int = 1280, height: int = 860, scheme: str = "light"):  # noqa: ANN202
        context = browser.new_context(viewport={"width": width, "height": height}, color_scheme=scheme,
                                      base_url=console.base)
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
        return page

    yield make
    for context in contexts:
        context.close()


def sign_in(page, key: str) -> None:  # noqa: ANN001
    page.goto("/console/signin")
    page.get_by_test_id("api-key-input").fill(key)
    page.get_by_test_id("sign-in").click()
    page.wait_for_load_state()
    assert "/console/signin" not in page.url, page.content()[:2000]


def shoot(page, console: Console, name: str) -> None:  # noqa: ANN001
    """A small screenshot of the page (JPEG, the viewport) for docs/console/."""
    page.screenshot(path=str(console.shots / f"{name}.jpg"), type="jpeg", quality=70)


def csrf_of(page) -> str:  # noqa: ANN001
    return page.locator('meta[name="csrf-token"]').get_attribute("content")


MONEY = re.compile(r"^\$\d+(\.\d+)?$")
