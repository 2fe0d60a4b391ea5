"""Alembic migrations over a database that already holds rows: an upgrade keeps every row of the older
schema, and the new tables work on top of it (0002: stored responses, cascading with their account)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import sqlalchemy.ext.asyncio
from alembic import command
from sqlalchemy.engine import Connection

from flashserve.accounts.db import alembic_config, create_engine, migrate
from flashserve.accounts.ledger import Ledger, UsageRecord
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
    from alembic.script import ScriptDirectory

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
