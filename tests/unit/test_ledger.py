"""The ledger on real databases (a SQLite file and PostgreSQL): atomic usage rows and debits,
no lost updates under concurrency, keys, top-ups, reports, and migrations that match the schema."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from flashserve.accounts.clock import utcnow
from flashserve.accounts.keys import KeyLimits
from flashserve.accounts.ledger import UsageRecord
from flashserve.accounts.pricing import TokenPrices
from flashserve.accounts.service import Accounts, Bootstrap
from flashserve.accounts.tables import metadata

T = TypeVar("T")
PRICES = TokenPrices(2_800, 140_000, 280_000)


def run(url: str, work: Callable[[Accounts], Awaitable[T]], bootstrap: Bootstrap | None = None) -> T:
    async def main() -> T:
        async with Accounts(url, bootstrap) as accounts:
            return await work(accounts)

    return asyncio.run(main())


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def record(account_id: str, key_id: str, prompt: int, cached: int, completion: int,
           status: str = "ok") -> UsageRecord:
    return UsageRecord(request_id=uuid.uuid4().hex, account_id=account_id, key_id=key_id, model="m",
                       prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion, reasoning_tokens=0,
                       cost_pusd=PRICES.cost(prompt, cached, completion), status=status, latency_ms=5)


def test_migrations_create_exactly_the_declared_schema(database_url: str) -> None:
    async def work(accounts: Accounts) -> list[Any]:
        assert accounts.engine is not None
        async with accounts.engine.connect() as conn:
            return await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), metadata))

    assert run(database_url, work) == []
    # Running them again is a no-op.
    assert run(database_url, work) == []


def test_hundred_concurrent_debits_lose_nothing(database_url: str) -> None:
    async def work(accounts: Accounts) -> tuple[dict[str, int], list[dict[str, Any]]]:
        account = await accounts.ledger.create_account(unique("acct"), 10**12)
        _, key = await accounts.keys.create(account["id"], "k")
        recs = [record(account["id"], key["id"], 100 + i, (i * 16) % 100, i % 7) for i in range(100)]
        await asyncio.gather(*(accounts.ledger.record(r) for r in recs))
        return await accounts.ledger.audit(account["id"]), await accounts.ledger.records(account["id"], 1000)

    audit, rows = run(database_url, work)
    assert len(rows) == 100
    spent = sum(r["cost_pusd"] for r in rows)
    assert {k: audit[k] for k in ("balance_pusd", "topups_pusd", "spent_pusd")} == {
        "balance_pusd": 10**12 - spent, "topups_pusd": 10**12, "spent_pusd": spent}
    assert audit["ok"], audit


def test_a_failed_transaction_writes_neither_row_nor_debit(database_url: str) -> None:
    async def work(accounts: Accounts) -> tuple[dict[str, int], int]:
        account = await accounts.ledger.create_account(unique("acct"), 10**9)
        _, key = await accounts.keys.create(account["id"], "k")
        first = record(account["id"], key["id"], 10, 0, 1)
        await accounts.ledger.record(first)
        duplicate = record(account["id"], key["id"], 10, 0, 1)
        duplicate.request_id = first.request_id  # violates the unique request id after the insert is tried
        with pytest.raises(sa.exc.IntegrityError):
            await accounts.ledger.record(duplicate)
        return await accounts.ledger.audit(account["id"]), len(await accounts.ledger.records(account["id"]))

    audit, count = run(database_url, work)
    assert count == 1
    assert audit["balance_pusd"] == audit["topups_pusd"] - audit["spent_pusd"] == 10**9 - PRICES.cost(10, 0, 1)


def test_keys_verify_revoke_and_expire(database_url: str) -> None:
    async def work(accounts: Accounts) -> None:
        account = await accounts.ledger.create_account(unique("acct"))
        key, view = await accounts.keys.create(account["id"], "mine", limits=KeyLimits(rpm=5))
        assert "key" not in view and "digest" not in view and key not in str(view)
        assert view["prefix"] == key[:12]
        principal = await accounts.keys.verify(key)
        assert principal is not None and principal.account_id == account["id"] and principal.limits.rpm == 5
        assert await accounts.keys.verify(key + "x") is None
        assert await accounts.keys.verify("") is None
        listed = await accounts.keys.list(account["id"])
        assert [k["id"] for k in listed] == [view["id"]] and key not in str(listed)
        await accounts.keys.revoke(view["id"])
        assert await accounts.keys.verify(key) is None
        old, _ = await accounts.keys.create(account["id"], "old", expires_at=utcnow() - timedelta(seconds=1))
        assert await accounts.keys.verify(old) is None
        fresh, _ = await accounts.keys.create(account["id"], "new", expires_at=utcnow() + timedelta(hours=1))
        assert await accounts.keys.verify(fresh) is not None

    run(database_url, work)


def test_bootstrap_key_joins_the_default_account_once(database_url: str) -> None:
    boot = Bootstrap(api_key=unique("sk-fs-boot"), default_balance_pusd=7 * 10**12)

    async def work(accounts: Accounts) -> tuple[Any, Any]:
        principal = await accounts.keys.verify(boot.api_key or "")
        return principal, await accounts.ledger.account_by_name("default")

    principal, default = run(database_url, work, boot)
    assert principal is not None and principal.account_id == default["id"]
    # Restarting with the same key adds nothing.
    principal2, _ = run(database_url, work, boot)
    assert principal2 is not None and principal2.key_id == principal.key_id


def test_reports_group_by_key_model_and_day(database_url: str) -> None:
    async def work(accounts: Accounts) -> dict[str, list[dict[str, Any]]]:
        account = await accounts.ledger.create_account(unique("acct"), 10**12)
        _, k1 = await accounts.keys.create(account["id"], "one")
        _, k2 = await accounts.keys.create(account["id"], "two")
        r1 = record(account["id"], k1["id"], 100, 50, 10)
        r2 = record(account["id"], k2["id"], 200, 0, 20)
        r2.model = "other"
        r3 = record(account["id"], k2["id"], 100, 100, 0)
        r3.created_at = utcnow() - timedelta(days=3)
        for r in (r1, r2, r3):
            await accounts.ledger.record(r)
        out = {g: await accounts.ledger.report(account["id"], group_by=g) for g in ("key", "model", "day")}
        out["recent"] = await accounts.ledger.report(account["id"], start=utcnow() - timedelta(days=1))
        return out

    out = run(database_url, work)
    by_key = {row["key_name"]: row for row in out["key"]}
    assert by_key["one"]["requests"] == 1 and by_key["two"]["requests"] == 2
    assert by_key["two"]["prompt_tokens"] == 300 and by_key["two"]["cached_tokens"] == 100
    assert by_key["two"]["cache_hit_ratio"] == pytest.approx(1 / 3, abs=1e-6)
    assert {row["group"]: row["requests"] for row in out["model"]} == {"m": 2, "other": 1}
    assert len(out["day"]) == 2 and sum(row["requests"] for row in out["day"]) == 3
    assert sum(row["cost_pusd"] for row in out["day"]) == sum(
        PRICES.cost(*t) for t in ((100, 50, 10), (200, 0, 20), (100, 100, 0)))
    assert sum(row["requests"] for row in out["recent"]) == 2


def test_top_up_and_unknown_account(database_url: str) -> None:
    async def work(accounts: Accounts) -> tuple[Any, Any]:
        account = await accounts.ledger.create_account(unique("acct"))
        return await accounts.ledger.top_up(account["id"], 5 * 10**12), await accounts.ledger.top_up("nope", 1)

    topped, missing = run(database_url, work)
    assert topped["balance_pusd"] == 5 * 10**12 and topped["balance_usd"] == "5"
    assert missing is None
