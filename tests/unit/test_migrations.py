"""Alembic migrations over a database that already holds rows: an upgrade keeps every row of the older
schema, and the new tables work on top of it (0002: stored responses, cascading with their account; 0003:
reserved balances, grants and spending caps). Also: gateways migrating one fresh PostgreSQL database at
once all succeed (the advisory lock in `accounts/db.py: migrate`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlalchemy.ext.asyncio
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from flashserve.accounts.db import alembic_config, create_engine, migrate
from flashserve.accounts.ledger import Ledger
from flashserve.accounts.pricing import TokenPrices
from flashserve.accounts.reservations import Charge, Reservations, SpendCaps, audit
from flashserve.accounts.stored_responses import ResponseStore
from tests.conftest import postgres_url

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _upgrade_to(revision: str):  # noqa: ANN202 - a run_sync callable
    def upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return upgrade


HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a SQLite file, or a PostgreSQL database made for this test on the test server."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        return
    base = postgres_url()
    name = f"flashserve_migration_{uuid.uuid4().hex[:12]}"
    admin = sa.ext.asyncio.create_async_engine(base, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


async def test_0002_upgrades_a_populated_0001_database(empty_database: str) -> None:
    engine = create_engine(empty_database)
    now = datetime(2026, 11, 30, 12, 0, 0)
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade_to("0001"))
        await conn.execute(sa.text("INSERT INTO accounts (id, name, balance_pusd, created_at) "
                                   "VALUES ('acct_old', 'old', 5000, :t)"), {"t": now})
        await conn.execute(sa.text("INSERT INTO api_keys (id, account_id, name, prefix, digest, created_at) "
                                   "VALUES ('key_old', 'acct_old', 'k', 'sk-', :d, :t)"), {"d": "0" * 64, "t": now})
        await conn.execute(sa.text(
            "INSERT INTO usage_records (request_id, account_id, key_id, model, prompt_tokens, cached_tokens, "
            "completion_tokens, reasoning_tokens, cost_pusd, status, latency_ms, created_at) VALUES "
            "('req-old', 'acct_old', 'key_old', 'm', 10, 0, 2, 0, 100, 'ok', 5, :t)"), {"t": now})
        tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        assert "stored_responses" not in tables

    await migrate(engine)  # what start-up runs: 0001 -> head
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar() == HEAD
        assert (await conn.execute(sa.text("SELECT balance_pusd FROM accounts"))).scalar() == 5000
        assert (await conn.execute(sa.text("SELECT count(*) FROM usage_records"))).scalar() == 1
        fks = await conn.run_sync(lambda c: sa.inspect(c).get_foreign_keys("stored_responses"))
    assert fks[0]["referred_table"] == "accounts" and fks[0]["options"].get("ondelete") == "CASCADE"

    store = ResponseStore(engine)
    await store.save("acct_old", "resp_1", {"id": "resp_1"}, [{"type": "message"}], [], timedelta(days=30))
    await store.save("acct_old", "resp_gone", {"id": "resp_gone"}, [], [], timedelta(seconds=-1))
    got = await store.get("acct_old", "resp_1")
    assert got is not None and got.response == {"id": "resp_1"} and got.input_items == [{"type": "message"}]
    assert await store.get("acct_other", "resp_1") is None  # another account: absent
    assert await store.get("acct_old", "resp_gone") is None  # expired: absent before any purge
    assert await store.purge_expired() == 1
    async with engine.begin() as conn:  # deleting the account deletes its stored responses
        await conn.execute(sa.text("DELETE FROM usage_records"))
        await conn.execute(sa.text("DELETE FROM api_keys"))
        await conn.execute(sa.text("DELETE FROM accounts"))
        assert (await conn.execute(sa.text("SELECT count(*) FROM stored_responses"))).scalar() == 0
    await migrate(engine)  # idempotent at head
    await engine.dispose()


async def test_0003_upgrades_a_populated_0002_database(empty_database: str) -> None:
    """Rows written by the 0002 schema (an account with a top-up and a usage row, a key) keep their meaning:
    the balance is free money, nothing is reserved or granted, the old top-up is a top-up, and the ledger
    identity holds; then reservations, grants and caps work on them."""
    engine = create_engine(empty_database)
    now = datetime(2026, 12, 1, 12, 0, 0)
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade_to("0002"))
        await conn.execute(sa.text("INSERT INTO accounts (id, name, balance_pusd, created_at) "
                                   "VALUES ('acct_old', 'old', 4900, :t)"), {"t": now})
        await conn.execute(sa.text("INSERT INTO topups (account_id, amount_pusd, note, created_at) "
                                   "VALUES ('acct_old', 5000, 'opening balance', :t)"), {"t": now})
        await conn.execute(sa.text("INSERT INTO api_keys (id, account_id, name, prefix, digest, created_at) "
                                   "VALUES ('key_old', 'acct_old', 'k', 'sk-', :d, :t)"), {"d": "1" * 64, "t": now})
        await conn.execute(sa.text(
            "INSERT INTO usage_records (request_id, account_id, key_id, model, prompt_tokens, cached_tokens, "
            "completion_tokens, reasoning_tokens, cost_pusd, status, latency_ms, created_at) VALUES "
            "('req-old', 'acct_old', 'key_old', 'm', 10, 0, 2, 0, 100, 'ok', 5, :t)"), {"t": now})

    await migrate(engine)
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar() == HEAD
        row = (await conn.execute(sa.text("SELECT balance_pusd, reserved_pusd, granted_pusd FROM accounts"))).one()
        assert tuple(row) == (4900, 0, 0)
        assert (await conn.execute(sa.text("SELECT kind FROM topups"))).scalar() == "topup"
        caps = (await conn.execute(sa.text("SELECT daily_cap_pusd, monthly_cap_pusd FROM api_keys"))).one()
        assert tuple(caps) == (None, None)
    [before] = await audit(engine, "acct_old")
    assert before["ok"] and before["credits_pusd"] == 5000 and before["charges_pusd"] == 100, before

    await Ledger(engine).grant("acct_old", 1000)
    prices = TokenPrices(1, 10, 20)
    hold = await Reservations(engine, "gw_test").reserve(
        request_id="req-new", account_id="acct_old", key_id="key_old", caps=SpendCaps(daily_pusd=10**6),
        model="m", prices=prices, prompt_tokens=100, max_tokens=10_000)
    assert hold.clamped and hold.amount_pusd <= 5900 and hold.max_tokens == (5900 - 100 * 10) // 20
    [held] = await audit(engine, "acct_old")
    assert held["ok"] and held["reserved_pusd"] == hold.amount_pusd and held["open_reservations"] == 1, held
    charged = await Reservations(engine, "gw_test").settle(Charge(
        request_id="req-new", account_id="acct_old", key_id="key_old", model="m", prompt_tokens=100,
        cached_tokens=0, completion_tokens=5, reasoning_tokens=0, cost_pusd=1100, status="ok", latency_ms=3))
    assert charged == 1100
    [after] = await audit(engine, "acct_old")
    assert after["ok"] and after["balance_pusd"] == 5900 - 1100 and after["granted_pusd"] == 0, after
    await engine.dispose()


async def test_gateways_migrating_one_fresh_postgresql_database_at_once_all_succeed() -> None:
    """Six engines run every migration on the same empty database at the same moment (six gateways
    starting together): the advisory lock lets one migrate and the others find the schema at head."""
    base = postgres_url()
    name = f"flashserve_race_{uuid.uuid4().hex[:12]}"
    admin = sa.ext.asyncio.create_async_engine(base, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engines = [create_engine(base.rsplit("/", 1)[0] + "/" + name) for _ in range(6)]
    try:
        import asyncio

        await asyncio.gather(*(migrate(e) for e in engines))
        async with engines[0].connect() as conn:
            assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalars().all() == [HEAD]
    finally:
        for e in engines:
            await e.dispose()
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
