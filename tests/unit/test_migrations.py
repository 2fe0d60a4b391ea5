"""Alembic migrations over a database that already holds rows: an upgrade keeps every row of the older
schema, and the new tables work on top of it (0002: stored responses, cascading with their account; 0006:
top-up codes and console users)."""

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
from flashserve.accounts.keys import KeyLimits, KeyStore, digest
from flashserve.accounts.ledger import Ledger, UsageRecord
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


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


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
        assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar() == _head()
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


async def test_0004_upgrades_a_populated_0002_database(empty_database: str) -> None:
    """Accounts and keys of the 0002 schema keep working, unlimited at the account level, until limits are set."""
    engine = create_engine(empty_database)
    now = datetime(2026, 12, 1, 12, 0, 0)
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade_to("0002"))
        await conn.execute(sa.text("INSERT INTO accounts (id, name, balance_pusd, created_at) "
                                   "VALUES ('acct_old', 'old', 5000, :t)"), {"t": now})
        await conn.execute(sa.text("INSERT INTO api_keys (id, account_id, name, prefix, digest, created_at, rpm) "
                                   "VALUES ('key_old', 'acct_old', 'k', 'sk-fs-old', :d, :t, 7)"),
                           {"d": digest("sk-fs-old-key"), "t": now})
        await conn.execute(sa.text(
            "INSERT INTO stored_responses (id, account_id, created_at, expires_at, response, input_items, "
            "conversation) VALUES ('resp_old', 'acct_old', :t, :t, '{}', '[]', '[]')"), {"t": now})

    await migrate(engine)  # 0002 -> head
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar() == _head()
        assert (await conn.execute(sa.text("SELECT count(*) FROM stored_responses"))).scalar() == 1
    ledger, keys = Ledger(engine), KeyStore(engine)
    account = await ledger.get_account("acct_old")
    assert account is not None and account["balance_pusd"] == 5000
    assert all(account[c] is None for c in ("max_concurrent", "rpm", "tpm", "user_max_concurrent", "user_rpm",
                                            "user_tpm"))
    principal = await keys.verify("sk-fs-old-key")
    assert principal is not None and principal.limits == KeyLimits(rpm=7)
    assert principal.account_limits.unlimited and principal.user_limits.unlimited

    changed = await ledger.set_limits("acct_old", {"max_concurrent": 3, "user_rpm": 5})
    assert changed is not None and changed["max_concurrent"] == 3 and changed["user_rpm"] == 5
    principal = await keys.verify("sk-fs-old-key")
    assert principal is not None
    assert principal.account_limits == KeyLimits(max_concurrent=3) and principal.user_limits == KeyLimits(rpm=5)
    assert await ledger.set_limits("acct_missing", {"rpm": 1}) is None

    async with engine.begin() as conn:  # and back down: 0004's columns go, the rows stay
        def downgrade(connection: Connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0002")
        await conn.run_sync(downgrade)
        columns = await conn.run_sync(lambda c: [col["name"] for col in sa.inspect(c).get_columns("accounts")])
        assert "user_rpm" not in columns
        assert (await conn.execute(sa.text("SELECT balance_pusd FROM accounts"))).scalar() == 5000
    await engine.dispose()


async def test_0006_upgrades_a_populated_0002_database(empty_database: str) -> None:
    """0006 (top-up codes, console users) over a database holding 0002's rows: every row stays, and a code
    redeemed on the upgraded database credits an old account once, with its audit row."""
    from flashserve.accounts.console_users import ConsoleUsers
    from flashserve.accounts.ledger import Ledger
    from flashserve.accounts.topup_codes import RedeemError, TopUpCodes

    engine = create_engine(empty_database)
    now = datetime(2026, 12, 1, 12, 0, 0)
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade_to("0002"))
        await conn.execute(sa.text("INSERT INTO accounts (id, name, balance_pusd, created_at) "
                                   "VALUES ('acct_old', 'old', 5000, :t)"), {"t": now})
        await conn.execute(sa.text("INSERT INTO topups (account_id, amount_pusd, note, created_at) "
                                   "VALUES ('acct_old', 5000, 'opening balance', :t)"), {"t": now})
        await conn.execute(sa.text("INSERT INTO api_keys (id, account_id, name, prefix, digest, created_at) "
                                   "VALUES ('key_old', 'acct_old', 'k', 'sk-', :d, :t)"), {"d": "1" * 64, "t": now})
        await conn.execute(sa.text(
            "INSERT INTO stored_responses (id, account_id, created_at, expires_at, response, input_items, "
            "conversation) VALUES ('resp_old', 'acct_old', :t, :t, '{}', '[]', '[]')"), {"t": now})
        tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        assert "topup_codes" not in tables and "console_users" not in tables

    await migrate(engine)
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar() == _head()
        assert (await conn.execute(sa.text("SELECT count(*) FROM stored_responses"))).scalar() == 1
        assert (await conn.execute(sa.text("SELECT count(*) FROM api_keys"))).scalar() == 1
    codes = TopUpCodes(engine)
    _, [code] = await codes.create_batch(1, 7000, "migration test")
    assert (await codes.redeem(code, "acct_old")).amount_pusd == 7000
    with pytest.raises(RedeemError):
        await codes.redeem(code, "acct_old")
    ledger = Ledger(engine)
    assert await ledger.balance("acct_old") == 12000
    audit = await ledger.audit("acct_old")
    assert audit["balance_pusd"] == audit["topups_pusd"] - audit["spent_pusd"] == 12000
    users = ConsoleUsers(engine)
    name = f"user-{uuid.uuid4().hex[:8]}"
    user = await users.register(name, "a long password", 0)
    assert (await users.authenticate(name, "a long password")) == user
    assert await users.authenticate(name, "wrong password") is None
    await engine.dispose()


async def test_0005_adds_the_request_id_to_a_populated_0002_database(empty_database: str) -> None:
    engine = create_engine(empty_database)
    now = datetime(2026, 12, 1, 12, 0, 0)
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade_to("0002"))
        await conn.execute(sa.text("INSERT INTO accounts (id, name, balance_pusd, created_at) "
                                   "VALUES ('acct_old', 'old', 5000, :t)"), {"t": now})
        await conn.execute(sa.text("INSERT INTO api_keys (id, account_id, name, prefix, digest, created_at) "
                                   "VALUES ('key_old', 'acct_old', 'k', 'sk-', :d, :t)"), {"d": "0" * 64, "t": now})
        await conn.execute(sa.text(
            "INSERT INTO usage_records (request_id, account_id, key_id, model, prompt_tokens, cached_tokens, "
            "completion_tokens, reasoning_tokens, cost_pusd, status, latency_ms, created_at) VALUES "
            "('req-old', 'acct_old', 'key_old', 'm', 10, 0, 2, 0, 100, 'ok', 5, :t)"), {"t": now})

    await migrate(engine)
    ledger = Ledger(engine)
    await ledger.record(UsageRecord("chatcmpl-new", "acct_old", "key_old", "m", 4, 0, 1, 0, 7, "ok", 3,
                                    x_request_id="client-trace-42"))
    rows = {r["request_id"]: r for r in await ledger.records("acct_old")}
    assert rows["req-old"]["x_request_id"] is None and rows["req-old"]["cost_pusd"] == 100  # kept as it was
    assert rows["chatcmpl-new"]["x_request_id"] == "client-trace-42"
    async with engine.connect() as conn:
        indexes = await conn.run_sync(lambda c: sa.inspect(c).get_indexes("usage_records"))
        assert (await conn.execute(sa.text("SELECT balance_pusd FROM accounts"))).scalar() == 5000 - 7
    assert any(ix["column_names"] == ["x_request_id"] for ix in indexes)
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
        assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar() == _head()
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
            assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalars().all() == [_head()]
    finally:
        for e in engines:
            await e.dispose()
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
