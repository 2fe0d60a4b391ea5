"""The request path's ledger transactions on SQLite, run on the event loop's own thread.

Why: through SQLAlchemy's async engine every statement of a transaction hops to aiosqlite's thread and
back (a future, a self-pipe wake-up, a greenlet switch), which made a request's reservation and settlement
most of the gateway's CPU (README "Gateway overhead"). Here the same statements (`reservations.py` builds
them once with SQLAlchemy), compiled once for the sqlite3 module, run in one go on the loop's thread: a
SQLite transaction in WAL mode with `synchronous=NORMAL` (`db.py` says how durable that is) takes tens of
microseconds and never waits on a disk.

It never waits on a lock either. Its connection's busy timeout is zero: when another connection (the
upkeep task, an admin's top-up, the CLI in another process) holds SQLite's write lock, the transaction is
rolled back and `Busy` raised, and the caller takes the ordinary async path, which waits its turn. Nor does
it checkpoint the WAL (that fsyncs, which must not happen on the loop's thread): `checkpoint` is run from a
worker thread by `Accounts.maintain`.
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")
_DIALECT = sqlite.dialect(paramstyle="named")


class Busy(Exception):
    """Another connection holds SQLite's write lock: nothing was written, take the async path."""


@dataclass(frozen=True, slots=True)
class HotStatement:
    """A SQLAlchemy statement compiled for sqlite3, with the converters of its typed parameters (a
    datetime is stored as SQLAlchemy stores it, so both paths read and compare the same text)."""

    sql: str
    converters: Mapping[str, Callable[[Any], Any]]

    @classmethod
    def of(cls, statement: sa.Executable) -> HotStatement:
        compiled = statement.compile(dialect=_DIALECT)  # type: ignore[attr-defined]
        converters = {}
        for name, bind in compiled.binds.items():
            convert = bind.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
            if convert is not None:
                converters[name] = convert
        return cls(str(compiled), converters)

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {k: (self.converters[k](v) if k in self.converters else v) for k, v in values.items()}


class Transaction:
    """The statements of one hot transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, statement: HotStatement, values: Mapping[str, Any]) -> sqlite3.Cursor:
        return self._conn.execute(statement.sql, statement.params(values))


class SqliteHotPath:
    def __init__(self, path: str) -> None:
        # isolation_level=None: the transaction is ours (BEGIN IMMEDIATE takes the write lock up front).
        # Only the loop's thread uses it; check_same_thread would only refuse a test's second loop thread.
        self._conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "wal_autocheckpoint=0"):
            self._conn.execute(f"PRAGMA {pragma}")

    def run(self, work: Callable[[Transaction], T]) -> T:
        """`work` in one transaction, committed when it returns, rolled back when it raises. Raises `Busy`
        (nothing written) when another connection holds the write lock."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise Busy from None
            raise
        try:
            result = work(Transaction(self._conn))
            self._conn.execute("COMMIT")
        except BaseException as exc:
            self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                raise Busy from None
            raise
        return result

    def close(self) -> None:
        self._conn.close()


_ATTACHED: weakref.WeakKeyDictionary[AsyncEngine, SqliteHotPath] = weakref.WeakKeyDictionary()


def attach(engine: AsyncEngine, path: str) -> None:
    """Open the hot path of the SQLite database `engine` reaches at `path`."""
    _ATTACHED[engine] = SqliteHotPath(path)


def of(engine: AsyncEngine) -> SqliteHotPath | None:
    """The hot path opened with this engine: another engine (another database) has none."""
    return _ATTACHED.get(engine)


def detach(engine: AsyncEngine) -> None:
    hot = _ATTACHED.pop(engine, None)
    if hot is not None:
        hot.close()


def checkpoint(path: str) -> None:
    """Copy the WAL's committed pages into the database file (PASSIVE: never waits for a writer). Blocking:
    run it on a worker thread."""
    conn = sqlite3.connect(path, timeout=5)
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        conn.close()


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)
