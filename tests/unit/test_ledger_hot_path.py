"""The request path's ledger writes on real databases (a SQLite file and PostgreSQL): the hot paths
(`accounts/sqlite_hot.py`, `accounts/pg_hot.py`) hold and settle exactly as the SQLAlchemy path does, never
overspend under concurrency, settle once, write rows the rest of the ledger (reaper, audit) reads as its
own, and on SQLite step aside for another writer instead of waiting on the loop's thread. Plus the 1 s
verified-key cache: a change made through this process applies at once, and requests that miss it together
make one read."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from flashserve.accounts import pg_hot, sqlite_hot
from flashserve.accounts.keys import KeyLimits, KeyStore
from flashserve.accounts.pricing import TokenPrices
from flashserve.accounts.reservations import NO_CAPS, CannotPay, Charge, Hold, Reservations
from flashserve.accounts.service import Accounts, Bootstrap, sqlite_path

T = TypeVar("T")
PRICES = TokenPrices(2_800, 140_000, 280_000)
PROMPT, BUDGET = 10, 100
WHOLE = PROMPT * PRICES.input_cache_miss + BUDGET * PRICES.output  # one request's full reservation


def run(url: str, work: Callable[[Accounts], Awaitable[T]]) -> T:
    async def main() -> T:
        async with Accounts(url, Bootstrap()) as accounts:
            return await work(accounts)

    return asyncio.run(main())


async def new_key(accounts: Accounts, balance_pusd: int) -> tuple[str, str]:
    account = await accounts.ledger.create_account(f"hot-{uuid.uuid4().hex[:8]}", balance_pusd)
    _, key = await accounts.keys.create(account["id"], "k")
    return account["id"], key["id"]


async def reserve(res: Reservations, account_id: str, key_id: str, request_id: str) -> Hold:
    return await res.reserve(request_id=request_id, account_id=account_id, key_id=key_id, caps=NO_CAPS, model="m",
                             prices=PRICES, prompt_tokens=PROMPT, max_tokens=BUDGET)


def charge(account_id: str, key_id: str, request_id: str, completion: int = 20) -> Charge:
    return Charge(request_id=request_id, account_id=account_id, key_id=key_id, model="m", prompt_tokens=PROMPT,
                  cached_tokens=0, completion_tokens=completion, reasoning_tokens=0,
                  cost_pusd=PRICES.cost(PROMPT, 0, completion), status="ok", latency_ms=3, x_request_id="trace-1")


def test_the_hot_path_is_the_one_that_runs(database_url: str) -> None:
    async def work(accounts: Accounts) -> tuple[object, object]:
        assert accounts.engine is not None
        return sqlite_hot.of(accounts.engine), pg_hot.of(accounts.engine)

    on_sqlite, on_pg = run(database_url, work)
    assert (on_sqlite is not None) == database_url.startswith("sqlite")
    assert (on_pg is not None) == database_url.startswith("postgresql")


def test_concurrent_holds_never_overspend_and_each_settles_once(database_url: str) -> None:
    async def work(accounts: Accounts) -> None:
        account_id, key_id = await new_key(accounts, 3 * WHOLE + WHOLE // 2)  # three whole budgets and a half
        res = accounts.reservations
        ids = [f"req-{uuid.uuid4().hex}" for _ in range(8)]
        outcomes = await asyncio.gather(*(reserve(res, account_id, key_id, i) for i in ids), return_exceptions=True)
        holds = [o for o in outcomes if isinstance(o, Hold)]
        assert all(isinstance(o, (Hold, CannotPay)) for o in outcomes), outcomes
        assert sum(not h.clamped for h in holds) == 3  # the whole budget, in the one conditional statement
        assert [h for h in holds if h.clamped] and all(h.max_tokens < BUDGET for h in holds if h.clamped)
        audit = await accounts.ledger.audit(account_id)
        assert audit["ok"] and audit["balance_pusd"] >= 0 and audit["open_reservations"] == len(holds), audit

        for hold in holds:
            assert await res.settle(charge(account_id, key_id, hold.request_id)) == PRICES.cost(PROMPT, 0, 20)
            assert await res.settle(charge(account_id, key_id, hold.request_id)) is None  # written once
        rows = await accounts.ledger.records(account_id)
        assert sorted(r["request_id"] for r in rows) == sorted(h.request_id for h in holds)
        assert all(r["status"] == "ok" and r["x_request_id"] == "trace-1" for r in rows)
        audit = await accounts.ledger.audit(account_id)
        assert audit["ok"] and audit["open_reservations"] == 0 and audit["reserved_pusd"] == 0, audit
        assert audit["balance_pusd"] == 3 * WHOLE + WHOLE // 2 - len(holds) * PRICES.cost(PROMPT, 0, 20)

    run(database_url, work)


def test_a_charge_over_the_hold_is_capped_at_it(database_url: str) -> None:
    async def work(accounts: Accounts) -> None:
        account_id, key_id = await new_key(accounts, 10 * WHOLE)
        res = accounts.reservations
        request_id = f"req-over-{uuid.uuid4().hex}"
        hold = await reserve(res, account_id, key_id, request_id)
        over = charge(account_id, key_id, request_id, completion=BUDGET + 50)  # an estimated prompt fell short
        assert await res.settle(over) == hold.amount_pusd
        [row] = await accounts.ledger.records(account_id)
        assert row["cost_pusd"] == hold.amount_pusd
        assert (await accounts.ledger.audit(account_id))["ok"]

    run(database_url, work)


def test_a_hold_from_the_hot_path_is_reaped_like_any_other(database_url: str) -> None:
    async def work(accounts: Accounts) -> None:
        assert accounts.engine is not None
        account_id, key_id = await new_key(accounts, 10 * WHOLE)
        await reserve(accounts.reservations, account_id, key_id, f"req-orphan-{uuid.uuid4().hex}")
        await asyncio.sleep(0.05)
        # Another gateway's reaper compares the hold's heartbeat, written by the hot path, with its cutoff
        # (a shared test database may hold other tests' leftovers too).
        other = Reservations(accounts.engine, f"gw_other_{uuid.uuid4().hex[:8]}")
        assert await other.reap(0.01) >= 1
        [row] = await accounts.ledger.records(account_id)
        assert row["status"] == "reaped" and row["cost_pusd"] == PROMPT * PRICES.input_cache_miss
        assert (await accounts.ledger.audit(account_id))["ok"]

    run(database_url, work)


def test_sqlite_hot_path_steps_aside_for_another_writer(tmp_path) -> None:  # noqa: ANN001 - pytest's fixture
    url = f"sqlite+aiosqlite:///{tmp_path / 'flashserve.db'}"

    async def work(accounts: Accounts) -> None:
        account_id, key_id = await new_key(accounts, 10 * WHOLE)
        other = sqlite3.connect(sqlite_path(url) or "", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the CLI, say, holds SQLite's write lock
        try:
            task = asyncio.create_task(reserve(accounts.reservations, account_id, key_id, f"req-{uuid.uuid4().hex}"))
            await asyncio.sleep(0.3)
            assert not task.done()  # waiting on the async path, with the loop free meanwhile
        finally:
            other.execute("COMMIT")
            other.close()
        hold = await asyncio.wait_for(task, 30)
        assert not hold.clamped
        assert (await accounts.ledger.audit(account_id))["open_reservations"] == 1

    run(url, work)


def test_a_verified_key_is_remembered_but_a_change_here_applies_at_once(tmp_path) -> None:  # noqa: ANN001
    url = f"sqlite+aiosqlite:///{tmp_path / 'flashserve.db'}"

    async def work(accounts: Accounts) -> None:
        account = await accounts.ledger.create_account("cache", 10 * WHOLE)
        secret, key = await accounts.keys.create(account["id"], "k")
        first = await accounts.keys.verify(secret)
        assert first is not None and first.limits == KeyLimits()
        assert await accounts.keys.verify(secret) is first  # remembered: no row read
        await accounts.keys.set_limits(key["id"], {"rpm": 7})
        assert (await accounts.keys.verify(secret)).limits.rpm == 7  # type: ignore[union-attr]
        await accounts.ledger.set_limits(account["id"], {"tpm": 900})
        assert (await accounts.keys.verify(secret)).account_limits.tpm == 900  # type: ignore[union-attr]
        # Requests that miss together make one read, not one each.
        reads = 0
        read = KeyStore._verify

        async def counted(store: KeyStore, presented_digest: str):  # noqa: ANN202 - KeyStore._verify's
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.05)
            return await read(store, presented_digest)

        await accounts.keys.set_limits(key["id"], {"rpm": 8})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(KeyStore, "_verify", counted)
            seen = await asyncio.gather(*(accounts.keys.verify(secret) for _ in range(16)))
        assert reads == 1 and all(p is not None and p.limits.rpm == 8 for p in seen)
        await accounts.keys.revoke(key["id"])
        assert await accounts.keys.verify(secret) is None
        assert await accounts.keys.verify("sk-fs-unknown") is None

    run(url, work)


@pytest.mark.parametrize("statement", ["RESERVE_WHOLE", "SETTLE"])
def test_pg_statements_name_only_declared_columns(statement: str) -> None:
    from flashserve.accounts.tables import reservations, usage_records

    sql = getattr(pg_hot, statement)
    table = reservations if statement == "RESERVE_WHOLE" else usage_records
    inserted = sql.split(f"INSERT INTO {table.name} (", 1)[1].split(")", 1)[0]
    columns = [c.strip() for c in inserted.split(",")]
    assert set(columns) <= set(table.c.keys()) and len(columns) == len(set(columns))
    assert set(table.c.keys()) - set(columns) <= {"id"}  # every column but the generated id is written
