"""The accounts database: an async SQLAlchemy engine over a SQLite file in the
data directory by default, or PostgreSQL (`postgresql+asyncpg://...`) by URL,
with the schema brought up to date by Alembic at start-up.

Durability of a commit: on PostgreSQL, the server's (`synchronous_commit`, on by default: flushed to its WAL
before the commit returns). On SQLite, WAL mode with `synchronous=NORMAL`: a commit is appended to the WAL
file in the OS page cache without an fsync (the WAL is fsynced at each checkpoint), so a committed row
survives a crash or SIGKILL of the process (the kernel still holds its pages); only a power cut or a kernel
crash can lose the last commits before a checkpoint. An fsync per commit (`FULL`) cost a request more than
all of the gateway's other work together (README "Gateway overhead").

SQLite takes one writer at a time and makes the others poll for its lock with growing sleeps (up to
100 ms each), which turned a burst of requests into a tail of seconds. `write_transaction` makes this
process's writers queue in order on an asyncio lock instead; PostgreSQL's row locks need no such queue.

On PostgreSQL the upgrade runs under a transaction-scoped advisory lock, so gateways starting together on
one database take turns: the first migrates, the others then find the schema at head and do nothing
(without it two of them raced on `CREATE TABLE alembic_version`).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"
# The advisory lock's key: any constant 64-bit number every flashserve gateway agrees on ("flashsrv").
MIGRATION_LOCK_KEY = 0x666C617368737276


def default_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{(Path(data_dir) / 'flashserve.db').resolve()}"


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A writer waits up to 30 s for the lock instead of failing at once under concurrency.
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # A database that does not answer fails a connection attempt in 10 s (asyncpg waits 60 by default), so a
    # request's settlement reaches the outbox, and an admission its 503, in bounded time.
    connect_args = {"timeout": 10} if "+asyncpg" in url else {}
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True, connect_args=connect_args)


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (usage reports, the CLI) run while the server writes; NORMAL sync makes a
    # committed usage row survive a process crash or kill without an fsync per commit (module docstring).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_WRITE_LOCKS: weakref.WeakKeyDictionary[AsyncEngine, asyncio.Lock] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """`engine.begin()` for a transaction that writes: on SQLite, after this process's earlier writers
    (FIFO, on an asyncio lock) instead of racing them for the database's lock."""
    if engine.dialect.name != "sqlite":
        async with engine.begin() as conn:
            yield conn
        return
    lock = _WRITE_LOCKS.get(engine)
    if lock is None:
        lock = _WRITE_LOCKS[engine] = asyncio.Lock()
    async with lock, engine.begin() as conn:
        yield conn


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending migration (idempotent)."""

    def upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Held until this transaction ends (PostgreSQL's DDL is transactional: the whole upgrade commits
            # or none of it does), so a second gateway waits here, then sees the finished schema.
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await conn.run_sync(upgrade)
