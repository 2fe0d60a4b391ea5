"""End-to-end: the usage ledger stays exact under load, on a real server configured with PostgreSQL.

The invariant, for every account at every moment no request is in flight:
    balance == initial balance + top-ups - sum(cost_pusd of its usage rows)
and every row is complete (token counts are ints >= 0, cost_pusd is the price formula applied to them, status
is ok, error or cancelled).

A dedicated server on PostgreSQL (when FLASHSERVE_TEST_DATABASE_URL names a throwaway `postgresql+asyncpg://`
database, required when CI is set), started without FLASHSERVE_ADMIN_KEY so the admin key comes from the
banner. Exactly-once debits on SQLite and the client's hang-up moved in-process (tests/api/test_billing.py);
the SIGKILL under load and the restart on the same data dir moved to test_lifecycle.py. Every check uses
accounts the test creates itself, so data left in a PostgreSQL database by earlier runs does not matter.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import _log_tail, _stop, _wait_ready, start_server, started_early, starts_early
from tests.e2e.test_accounts_api import (
    MODEL,
    PUSD_PER_USD,
    check_cost_header,
    check_record,
    create_account,
    create_key,
    get_account,
    usage_price,
    wait_records,
)

API_KEY = "sk-flashserve-ledger-0123456789abcdef"
ADMIN_KEY = "sk-flashserve-ledger-admin-0123456789abcdef"
N_CONCURRENT = 100


@dataclass(frozen=True)
class LedgerServer:
    db: str
    base_url: str
    admin_key: str
    log_path: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.admin_key}"},
                            timeout=120.0)


def _database_url() -> str:
    url = os.environ.get("FLASHSERVE_TEST_DATABASE_URL")
    if url:
        return url
    message = ("FLASHSERVE_TEST_DATABASE_URL is not set: the PostgreSQL ledger tests need a throwaway database, "
               "e.g. postgresql+asyncpg://user:pass@localhost:5432/flashserve_test")
    if os.environ.get("CI"):
        pytest.fail(message + " (required when CI is set)", pytrace=False)
    pytest.skip(message)


# PostgreSQL only: the same test on SQLite, and the client's hang-up on both databases, run in-process
# (tests/api/test_billing.py); this keeps one real server configured with a PostgreSQL URL.
@starts_early("ledger_server")
def start_ledger_server(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.Popen, str, Path] | None:
    """The server on PostgreSQL, started early when there is a database to give it (else the fixture skips)."""
    url = os.environ.get("FLASHSERVE_TEST_DATABASE_URL")
    if not url:
        return None
    return start_server(tmp_path_factory, {"FLASHSERVE_API_KEY": API_KEY, "FLASHSERVE_DATABASE_URL": url},
                        unset=("FLASHSERVE_ADMIN_KEY", "FLASHSERVE_DATABASE_URL", "FLASHSERVE_DEFAULT_BALANCE_USD"))


@pytest.fixture(scope="module", params=["postgresql"])
def ledger_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LedgerServer]:
    _database_url()  # skips (locally) or fails (CI) without one
    started = started_early("ledger_server", tmp_path_factory)
    assert started is not None
    process, base, log = started
    try:
        _wait_ready(base, process, log)
        banner = log.read_text(errors="replace")
        match = re.search(r"admin key:\s+(\S+)", banner, re.IGNORECASE)
        assert match, f"no FLASHSERVE_ADMIN_KEY, and the banner names no generated admin key:\n{banner}"
        admin_key = match.group(1)
        assert len(admin_key) >= 32 and admin_key != API_KEY
        yield LedgerServer(request.param, base, admin_key, log)
    finally:
        _stop(process, log)


def _fail_with_log(log: Path, message: str) -> None:
    pytest.fail(f"{message}\nserver log:\n{_log_tail(log)}", pytrace=False)


def _chat_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Reply with the number {i}."}],
            "temperature": 0, "max_tokens": max_tokens}


def _sse_usage(lines: list[str]) -> tuple[str, dict]:
    cid, usage = None, None
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[len("data: "):])
            cid = cid or chunk["id"]
            usage = chunk.get("usage") or usage
    assert cid is not None and usage is not None, lines[-5:]
    assert lines and "data: [DONE]" in lines
    return cid, usage


# -------------------------------------------------------------------------------- 100 concurrent requests


async def _one(client: httpx.AsyncClient, i: int) -> tuple[str, dict]:
    body = _chat_body(i, 1 + i % 4)
    if i % 3 == 0:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines()]
            assert r.status_code == 200, (i, lines[:3])
        return _sse_usage(lines)
    r = await client.post("/v1/chat/completions", json=body)
    check_cost_header(r)
    return r.json()["id"], r.json()["usage"]


async def _run_concurrently(base: str, key: str, n: int) -> list[tuple[str, dict]]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=300.0,
                                 limits=limits) as client:
        return await asyncio.gather(*(_one(client, i) for i in range(n)))


def test_concurrent_requests_debit_exactly_what_they_record(ledger_server: LedgerServer) -> None:
    with ledger_server.admin() as admin:
        account = create_account(admin, "1", name=f"ledger-{ledger_server.db}-{uuid.uuid4().hex[:10]}")
        key = create_key(admin, account["id"])
        answers = asyncio.run(_run_concurrently(ledger_server.base_url, key["key"], N_CONCURRENT))
        assert len({cid for cid, _ in answers}) == N_CONCURRENT

        rows = wait_records(admin, account["id"], N_CONCURRENT, timeout=30)
        for row in rows:
            check_record(row)
            assert row["status"] == "ok" and row["account_id"] == account["id"] and row["key_id"] == key["id"]
        assert len({row["request_id"] for row in rows}) == N_CONCURRENT, "one row per request"
        assert {row["request_id"] for row in rows} == {cid for cid, _ in answers}
        charged = sum(row["cost_pusd"] for row in rows)
        assert charged == sum(usage_price(usage) for _, usage in answers), "rows cost what the answers said"

        balance = get_account(admin, account["id"])["balance_pusd"]
        if balance != PUSD_PER_USD - charged:
            _fail_with_log(ledger_server.log_path, f"balance {balance} != 10**12 - {charged} ({ledger_server.db})")
        totals = admin.get("/admin/usage", params={"account_id": account["id"], "group_by": "key"}).json()["data"]
        assert [(g["group"], g["requests"], g["cost_pusd"]) for g in totals] == [(key["id"], N_CONCURRENT, charged)]


# --------------------------------------------------------------------------------- client hang-up mid-stream
