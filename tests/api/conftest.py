"""The in-process API tier: the real app (`api/app.py: create_app`), real accounts on a temporary SQLite
file, and backends that need no model weights, driven over HTTP without a socket.

ALL construction lives here, so a change in how the app is assembled means changing this file, not the
tests: the tests talk HTTP only (`api.client`, `api.admin`, `api.openai()`), plus the few knobs of the
fakes (`api.scripted.release()`, `api.upstreams[...]`) and `api.drain()`, which is what SIGTERM calls.

Models in the catalog:
- `fake-local`: the real `LocalBackend` and engine over `tests/unit/fake_model.py: CountingModel` (a char
  tokenizer, ChatML): deterministic tokens, real scheduling, aborts and usage counters, in milliseconds;
  its queue is bounded (`LOCAL_MAX_ACTIVE`) for the 503 `overloaded` path.
- `scripted`: `fakes.py: ScriptedBackend`, which plays the request's script (hold, fail, refuse).
- `remote`: the real `RemoteBackend` against `fakes.py: FakeUpstream` "up-a" (DeepSeek's dialect).
- `remote-impatient` (a 0.2 s timeout, 2 retries) and `remote-wrong-key` (a key "up-a" refuses): the same
  upstream, for timeouts and credentials.
- `routed`: the real `Router` (round robin) over two `RemoteBackend`s against "up-b" and "up-c".
- `scripted-thinker`: an alias of `scripted` that thinks by default (`catalog.py: Alias`).

Requests go through `transport.py: StreamingASGITransport`, which streams (httpx's own ASGITransport
buffers the whole body, so no test could leave mid-stream with it). Every test here is an anyio test on
asyncio (each module sets `pytestmark = pytest.mark.anyio`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from flashserve.accounts.service import Accounts, Bootstrap
from flashserve.api.app import create_app, drain
from flashserve.backends.base import Backend
from flashserve.backends.local import LocalBackend, LocalModel
from flashserve.backends.remote import RemoteBackend
from flashserve.backends.router import Replica, Router
from flashserve.catalog import Alias, Catalog, RemoteSpec, make_card
from flashserve.chat.reasoning import ReasoningSpec
from flashserve.chat.template import CHATML_TEMPLATE, ChatTemplate
from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.metrics import EngineSeries
from tests.api.fakes import VOCAB_WORDS, FakeUpstream, PacedCountingModel, ScriptedBackend, char_tokenizer
from tests.api.transport import StreamingASGITransport
from tests.conftest import postgres_url

API_KEY = "sk-flashserve-api-tier-0123456789"
ADMIN_KEY = "sk-flashserve-api-tier-admin-0123456789"
UPSTREAM_KEY = "upstream-key"
BASE = "http://flashserve.test"
DEFAULT_BALANCE_PUSD = 10**12  # $1
LOCAL_MAX_ACTIVE = 4
LOCAL_CONTEXT = 512


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Api:
    app: FastAPI
    transport: StreamingASGITransport
    client: httpx.AsyncClient  # carries API_KEY (the default account's bootstrap key)
    admin: httpx.AsyncClient  # carries ADMIN_KEY
    scripted: ScriptedBackend
    local: LocalBackend
    model: PacedCountingModel  # fake-local's model: `model.delay_s` slows each engine step
    remote: RemoteBackend
    router: Router
    upstreams: dict[str, FakeUpstream]
    accounts: Accounts
    _clients: list[httpx.AsyncClient] = field(default_factory=list)

    def http(self, key: str = API_KEY) -> httpx.AsyncClient:
        """Another client (its own connection, as a second caller would have) with `key`."""
        c = httpx.AsyncClient(transport=self.transport, base_url=BASE, timeout=30.0,
                              headers={"Authorization": f"Bearer {key}"})
        self._clients.append(c)
        return c

    def openai(self, key: str = API_KEY) -> openai.AsyncOpenAI:
        """The real `openai` client over the same in-process transport."""
        http = httpx.AsyncClient(transport=self.transport, timeout=30.0)
        self._clients.append(http)
        return openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key=key, http_client=http, max_retries=0)

    async def drain(self, timeout_s: float) -> None:
        """What SIGTERM does (`flashserve/cli.py` calls `api/app.py: drain`)."""
        await drain(self.app, timeout_s)

    # -- ledger views: read from the database itself, so they work while the app drains (it then answers
    # nothing but /health) -------------------------------------------------------------------------------
    async def records(self, account_id: str | None = None) -> list[dict[str, Any]]:
        return await self.accounts.ledger.records(account_id, 10_000)

    async def default_account(self) -> str:
        return (await self.accounts.default_account())["id"]

    async def balance(self, account_id: str) -> int:
        return int(await self.accounts.ledger.balance(account_id) or 0)

    async def audit(self, account_id: str) -> dict[str, int]:
        return await self.accounts.ledger.audit(account_id)

    async def new_account(self, name: str, balance_usd: str = "1", **limits: int) -> tuple[str, str]:
        """A fresh account with one key (limits: max_concurrent, rpm, tpm); returns (account id, key). The name
        gets a random suffix: a PostgreSQL database keeps the accounts of earlier runs."""
        name = f"{name}-{uuid.uuid4().hex[:8]}"
        r = await self.admin.post("/admin/accounts", json={"name": name, "balance_usd": balance_usd})
        assert r.status_code == 201, r.text
        account = r.json()["id"]
        r = await self.admin.post("/admin/keys", json={"account_id": account, **limits})
        assert r.status_code == 201, r.text
        return account, r.json()["key"]


def _local_backend(model: PacedCountingModel) -> LocalBackend:
    config = EngineConfig(max_model_len=LOCAL_CONTEXT, num_kv_blocks=512, block_size=4, max_num_seqs=4,
                          max_num_batched_tokens=256)
    llm = LLMEngine(model, config, len(VOCAB_WORDS))
    llm.series = EngineSeries("fake-local")  # its /metrics series, checked in test_observability.py
    engine = AsyncEngine(llm)
    engine.start()
    card = LocalModel(char_tokenizer(), ChatTemplate(CHATML_TEMPLATE), (0,), LOCAL_CONTEXT, len(VOCAB_WORDS),
                      "fake" * 4)
    return LocalBackend(engine, card, max_active=LOCAL_MAX_ACTIVE)


def _remote(upstream: FakeUpstream, transport: StreamingASGITransport, retries: int, timeout_s: float = 10.0,
            key: str = UPSTREAM_KEY) -> RemoteBackend:
    spec = RemoteSpec(f"http://{upstream.name}/v1", "up-model", "deepseek", key, timeout_s=timeout_s, retries=retries)
    return RemoteBackend(spec, httpx.AsyncClient(transport=transport, timeout=timeout_s))


@pytest.fixture
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    """The app on a fresh SQLite file; a test parametrized `@pytest.mark.parametrize("api", ["sqlite",
    "postgresql"], indirect=True)` runs on PostgreSQL too (`tests/conftest.py: postgres_url`: required in CI,
    skipped locally without one; that database outlives the test, so such a test works in its own account)."""
    database = getattr(request, "param", "sqlite")
    url = postgres_url() if database == "postgresql" else f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    upstreams = {name: FakeUpstream(name, UPSTREAM_KEY) for name in ("up-a", "up-b", "up-c")}
    scripted = ScriptedBackend()
    model = PacedCountingModel()
    local = _local_backend(model)
    to_a = StreamingASGITransport(upstreams["up-a"].app)
    remote = _remote(upstreams["up-a"], to_a, retries=1)
    impatient = _remote(upstreams["up-a"], to_a, retries=2, timeout_s=0.2)
    wrong_key = _remote(upstreams["up-a"], to_a, retries=0, key="not-the-upstream-key")
    # No health URLs: the router's health loop would poll over the network. Failover still ejects.
    router = Router([Replica(name, _remote(upstreams[name], StreamingASGITransport(upstreams[name].app), 0))
                     for name in ("up-b", "up-c")], policy="round_robin")
    catalog: Catalog[Backend] = Catalog()
    created = int(time.time())
    for model_id, backend, context in (("fake-local", local, LOCAL_CONTEXT), ("scripted", scripted, 4096),
                                       ("remote", remote, 4096), ("routed", router, 4096),
                                       ("remote-impatient", impatient, 4096), ("remote-wrong-key", wrong_key, 4096)):
        catalog.add(make_card(model_id, context_length=context, reasoning=ReasoningSpec(), weights="none",
                              description=f"{model_id} (api tier)", created=created), backend)
    catalog.add_alias(Alias("scripted-thinker", "scripted", thinking=True))
    accounts = Accounts(url, Bootstrap(api_key=API_KEY, admin_key=ADMIN_KEY, default_balance_pusd=DEFAULT_BALANCE_PUSD))
    app = create_app(catalog, accounts, sse_keepalive_s=0.2)
    transport = StreamingASGITransport(app)
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=transport, base_url=BASE, timeout=30.0,
                                   headers={"Authorization": f"Bearer {API_KEY}"})
        admin = httpx.AsyncClient(transport=transport, base_url=BASE, timeout=30.0,
                                  headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        a = Api(app, transport, client, admin, scripted, local, model, remote, router, upstreams, accounts)
        try:
            yield a
        finally:
            model.delay_s = 0.0
            scripted.release()  # nothing left holding
            for upstream in upstreams.values():
                upstream.release()
            await transport.idle()
            for c in (client, admin, *a._clients):
                await c.aclose()
