"""End-to-end: the usage ledger stays exact under load, client hang-ups and a SIGKILL.

The invariant, for every account at every moment no request is in flight:
    balance == initial balance + top-ups - sum(cost_pusd of its usage rows)
and every row is complete (token counts are ints >= 0, cost_pusd is the price formula applied to them, status
is ok, error or cancelled).

Dedicated servers, each on its own data dir: one on PostgreSQL (when FLASHSERVE_TEST_DATABASE_URL names a
throwaway `postgresql+asyncpg://` database, required when CI is set; exactly-once debits on SQLite and the
client's hang-up moved in-process to tests/api/test_billing.py),
started without FLASHSERVE_ADMIN_KEY so the admin key comes from the banner; and one that is SIGKILLed
under load and restarted on the same data dir. Every check uses accounts the test creates itself, so data
left in a PostgreSQL database by earlier runs does not matter.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import REPO, _log_tail, _python, _stop, _wait_ready, start_server
from tests.e2e.test_accounts_api import (
    MODEL,
    PUSD_PER_USD,
    check_cost_header,
    check_record,
    create_account,
    create_key,
    get_account,
    records,
    usage_price,
    wait_records,
)

API_KEY = "sk-flashserve-ledger-0123456789abcdef"
ADMIN_KEY = "sk-flashserve-ledger-admin-0123456789abcdef"
N_CONCURRENT = 100
N_KILL = 20
NO_EOS = {"2": -100, "0": -100}  # SmolLM2's end-of-turn tokens: the model cannot stop before max_tokens


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
@pytest.fixture(scope="module", params=["postgresql"])
def ledger_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LedgerServer]:
    env = {"FLASHSERVE_API_KEY": API_KEY}
    if request.param == "postgresql":
        env["FLASHSERVE_DATABASE_URL"] = _database_url()
    process, base, log = start_server(tmp_path_factory, env, unset=("FLASHSERVE_ADMIN_KEY", "FLASHSERVE_DATABASE_URL",
                                                                     "FLASHSERVE_DEFAULT_BALANCE_USD"))
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


# ----------------------------------------------------------------------------------------- SIGKILL under load


@dataclass
class Outcome:
    ok: bool = False
    finished_at: float | None = None
    error: str | None = None


def _load_request(base: str, i: int, start: threading.Barrier, out: Outcome) -> None:
    # From 6 to 186 tokens: the short ones finish before the kill, the long ones are cut by it.
    body = _chat_body(i, 6 + (i % 10) * 20) | {"logit_bias": NO_EOS}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    start.wait(timeout=60)
    try:
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
                lines = list(r.iter_lines())
                ok = r.status_code == 200 and "data: [DONE]" in lines
        else:
            r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)
            ok = r.status_code == 200
        out.ok, out.finished_at = ok, time.monotonic()
    except httpx.HTTPError as e:  # the server was killed under this request
        out.error = repr(e)


def cli(data_dir: Path, *args: str) -> str:
    """Runs `flashserve ARGS --data-dir DATA_DIR` on the database of a stopped server; returns its output."""
    env = {k: v for k, v in os.environ.items() if k != "FLASHSERVE_DATABASE_URL"} | {"COLUMNS": "200"}
    cmd = [_python(), "-m", "flashserve", *args, "--data-dir", str(data_dir)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"$ {' '.join(cmd)} -> {done.returncode}\n{output}"
    return output


def _default_account(admin: httpx.Client) -> dict:
    r = admin.get("/admin/accounts")
    assert r.status_code == 200, r.text
    [default] = [a for a in r.json()["data"] if a["name"] == "default"]
    return default


def test_sigkill_under_load_leaves_a_consistent_ledger(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = tmp_path_factory.mktemp("ledger-sigkill") / "data"
    env = {"FLASHSERVE_API_KEY": API_KEY, "FLASHSERVE_ADMIN_KEY": ADMIN_KEY, "FLASHSERVE_DEFAULT_BALANCE_USD": "3"}
    unset = ("FLASHSERVE_DATABASE_URL",)
    process, base, log = start_server(tmp_path_factory, env, unset, data_dir=data_dir)
    outcomes = [Outcome() for _ in range(N_KILL)]
    try:
        _wait_ready(base, process, log)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
            default = _default_account(admin)
            assert default["balance_pusd"] == 3 * PUSD_PER_USD, default
            r = admin.post(f"/admin/accounts/{default['id']}/top-up", json={"amount_usd": "2"})
            assert r.status_code == 200 and r.json()["balance_pusd"] == 5 * PUSD_PER_USD, r.text

        start = threading.Barrier(N_KILL + 1)
        threads = [threading.Thread(target=_load_request, args=(base, i, start, out), daemon=True)
                   for i, out in enumerate(outcomes)]
        for t in threads:
            t.start()
        start.wait(timeout=60)
        deadline = time.monotonic() + 90
        while sum(o.ok for o in outcomes) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        done_before = sum(o.ok for o in outcomes)
        time.sleep(0.3)
        killed_at = time.monotonic()
        process.kill()  # SIGKILL: no shutdown hook runs
        process.wait(timeout=30)
        for t in threads:
            t.join(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert done_before >= 3, f"no request finished under load; log:\n{_log_tail(log)}"
    assert any(o.error or not o.ok for o in outcomes), "the kill came after all the requests had finished"
    settled = sum(1 for o in outcomes if o.ok and o.finished_at is not None and o.finished_at < killed_at - 0.25)

    # While it is down, the CLI works on the same database: a top-up, a new key, a new account.
    default_id = default["id"]
    cli(data_dir, "accounts", "top-up", default_id, "1")
    created = cli(data_dir, "keys", "create", default_id, "--name", "cli-key", "--rpm", "100")
    match = re.search(r"sk-fs-[A-Za-z0-9_\-]{20,}", created)
    assert match, f"`keys create` printed no key:\n{created}"
    cli_key = match.group(0)
    assert cli_key not in cli(data_dir, "keys", "list", "--account-id", default_id)
    cli_account = f"cli-{uuid.uuid4().hex[:8]}"
    cli(data_dir, "accounts", "create", cli_account, "--balance-usd", "2.5")
    assert cli_account in cli(data_dir, "accounts", "show")
    cli(data_dir, "usage", "--group-by", "model")

    # A restart on the same data dir, with another default balance: the existing default account keeps its own.
    env["FLASHSERVE_DEFAULT_BALANCE_USD"] = "7"
    process, base, log = start_server(tmp_path_factory, env, unset, data_dir=data_dir)
    try:
        _wait_ready(base, process, log)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
            default = _default_account(admin)
            assert default["id"] == default_id
            [created_by_cli] = [a for a in admin.get("/admin/accounts").json()["data"] if a["name"] == cli_account]
            assert created_by_cli["balance_pusd"] == 2_500_000_000_000
            keys = admin.get("/admin/keys", params={"account_id": default_id}).json()["data"]
            assert any(k["name"] == "cli-key" and k["rpm"] == 100 for k in keys), keys
            rows = records(admin, default["id"])
            for row in rows:
                check_record(row)
            assert len(rows) <= N_KILL and len({row["request_id"] for row in rows}) == len(rows)
            ok_rows = [row for row in rows if row["status"] == "ok"]
            assert len(ok_rows) >= settled, f"{settled} answers finished before the kill, only {len(ok_rows)} rows"
            charged = sum(row["cost_pusd"] for row in rows)
            assert default["balance_pusd"] == 6 * PUSD_PER_USD - charged, (default, rows)  # 3 + 2 + 1 (CLI)

            # and it goes on serving and charging, also with the key the CLI made
            r = httpx.post(f"{base}/v1/chat/completions", json=_chat_body(0, 1),
                           headers={"Authorization": f"Bearer {cli_key}"}, timeout=120)
            cost = check_cost_header(r)
            after = wait_records(admin, default["id"], len(rows) + 1)
            [new] = [row for row in after if row["request_id"] == r.json()["id"]]
            assert new["key_id"] == next(k["id"] for k in keys if k["name"] == "cli-key")
            assert _default_account(admin)["balance_pusd"] == 6 * PUSD_PER_USD - charged - cost
    finally:
        _stop(process, log)
