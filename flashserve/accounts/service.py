"""The accounts layer as one object the server holds: database, keys, ledger,
reservations (with this gateway's id and its settlement outbox) and rate
limiter, plus the start-up work (migrations, the default account and the
bootstrap key), the recovery a serving gateway runs once (`recover`) and the
upkeep it runs while serving (`maintain`: heartbeat, outbox replay, reaper)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from flashserve.accounts import pg_hot, sqlite_hot
from flashserve.accounts.console_users import ConsoleUsers
from flashserve.accounts.db import create_engine, migrate
from flashserve.accounts.keys import KeyStore
from flashserve.accounts.ledger import Ledger
from flashserve.accounts.limits import Limiter, MemoryLimiter
from flashserve.accounts.outbox import Outbox
from flashserve.accounts.reservations import Charge, Reservations
from flashserve.accounts.stored_responses import ResponseStore
from flashserve.accounts.topup_codes import TopUpCodes
from flashserve.accounts.usage_views import UsageViews

log = logging.getLogger(__name__)
DEFAULT_ACCOUNT = "default"
OUTBOX_FILE = "ledger-outbox.jsonl"
_SETTLE_ATTEMPTS = 2  # then the outbox: a request's end must not wait on a database that is away


@dataclass(slots=True)
class Bootstrap:
    """Keys and balances the server makes sure exist when it starts."""

    api_key: str | None = None  # becomes an ordinary key of the default account
    admin_key: str | None = None
    default_balance_pusd: int = 0


class Accounts:
    def __init__(self, database_url: str, bootstrap: Bootstrap | None = None, *, data_dir: Path | None = None,
                 reservation_lease_s: float = 60.0, limiter: Limiter | None = None) -> None:
        """`data_dir` holds the settlement outbox (default: the SQLite file's directory, else ./data).
        `reservation_lease_s`: a gateway silent this long has its reservations reaped by the others."""
        self.database_url = database_url
        self.bootstrap = bootstrap or Bootstrap()
        self.engine: AsyncEngine | None = None
        self.gateway_id = "gw_" + uuid.uuid4().hex[:20]  # this process, in its reservations
        self.reservation_lease_s = reservation_lease_s
        self.outbox = Outbox(Path(data_dir or _default_data_dir(database_url)) / OUTBOX_FILE)
        # This process's counters unless given the shared one (accounts/limits.py: make_limiter).
        self.limiter: Limiter = limiter or MemoryLimiter()
        self._admin_digest = (hashlib.sha256(self.bootstrap.admin_key.encode()).digest()
                              if self.bootstrap.admin_key else None)

    @property
    def keys(self) -> KeyStore:
        return KeyStore(self._started())

    @property
    def ledger(self) -> Ledger:
        return Ledger(self._started())

    @property
    def reservations(self) -> Reservations:
        return Reservations(self._started(), self.gateway_id)

    @property
    def responses(self) -> ResponseStore:
        """The Responses API's stored responses (`store: true`)."""
        return ResponseStore(self._started())

    @property
    def codes(self) -> TopUpCodes:
        """Single-use top-up codes (the console's admin page makes them, customers redeem them)."""
        return TopUpCodes(self._started())

    @property
    def console_users(self) -> ConsoleUsers:
        """The console's optional name-and-password users."""
        return ConsoleUsers(self._started())

    @property
    def usage_views(self) -> UsageViews:
        """Read-only usage views for the console."""
        return UsageViews(self._started())

    def _started(self) -> AsyncEngine:
        if self.engine is None:
            raise RuntimeError("Accounts.start() first")
        return self.engine

    async def start(self) -> None:
        self.engine = create_engine(self.database_url)
        await migrate(self.engine)
        path = sqlite_path(self.database_url)
        if path is not None:  # SQLite's request-path transactions run on the loop's thread (sqlite_hot.py)
            sqlite_hot.attach(self.engine, path)
        elif self.engine.dialect.name == "postgresql" and self.engine.dialect.driver == "asyncpg":
            pg_hot.attach(self.engine)  # and PostgreSQL's as one statement each (pg_hot.py)
        await self._ensure_bootstrap_key()

    # -- settlement: the database, else the outbox -------------------------------------------------------
    async def settle(self, charge: Charge) -> int | None:
        """Settle one request (`Reservations.settle`). When the database cannot take it, the settlement goes
        to the outbox (durable, replayed by `maintain`) and this returns None."""
        return await self._or_outbox(lambda: self.reservations.settle(charge), {"op": "settle",
                                                                                "charge": charge.as_dict()})

    async def cancel(self, request_id: str) -> None:
        """Release the reservation of a request that never reached the model."""
        await self._or_outbox(lambda: self.reservations.cancel(request_id), {"op": "cancel",
                                                                              "request_id": request_id})

    async def _or_outbox(self, write: Callable[[], Awaitable[int | None]], entry: dict) -> int | None:
        for attempt in range(_SETTLE_ATTEMPTS):
            try:
                return await write()
            except Exception:  # noqa: BLE001 - the database is away: durable locally instead
                if attempt + 1 < _SETTLE_ATTEMPTS:
                    await asyncio.sleep(0.2)
        await self.outbox.append(entry)
        log.error("ledger unreachable: %s %s kept in the outbox %s", entry["op"],
                  entry.get("request_id") or entry["charge"]["request_id"], self.outbox.path)
        return None

    async def _apply(self, entry: dict) -> None:
        if entry["op"] == "settle":
            await self.reservations.settle(Charge(**entry["charge"]))
        else:
            await self.reservations.cancel(entry["request_id"])

    async def replay_outbox(self) -> int:
        return await self.outbox.replay(self._apply)

    # -- a serving gateway's recovery and upkeep ---------------------------------------------------------
    async def recover(self) -> None:
        """Once, before serving: replay what an earlier run of this gateway left in its outbox; on SQLite
        (one gateway process by design) also settle every reservation an earlier process left open."""
        await self.replay_outbox()
        if self.database_url.startswith("sqlite"):
            reaped = await self.reservations.reap(0, everyone_else=True)
            if reaped:
                log.warning("settled %d reservation(s) an earlier process left open", reaped)

    async def maintain(self) -> None:
        """While serving: renew this gateway's reservations, replay the outbox, and reap the reservations of
        gateways silent for the lease. Runs until cancelled; a step that fails is retried next round."""
        beat = max(self.reservation_lease_s / 3, 0.05)
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while True:
            if self.outbox.path.exists() and self.outbox.path.stat().st_size:
                await _quietly("outbox replay", self.replay_outbox())
            path = sqlite_path(self.database_url)
            if path is not None:  # the hot path's connection leaves the WAL's checkpoints to us
                await _quietly("WAL checkpoint", asyncio.to_thread(sqlite_hot.checkpoint, path))
            if loop.time() >= next_beat:
                next_beat = loop.time() + beat
                await _quietly("reservation heartbeat", self.reservations.heartbeat())
                await _quietly("reservation reaper", self.reservations.reap(self.reservation_lease_s))
            await asyncio.sleep(min(1.0, beat))

    async def close(self) -> None:
        await self.limiter.close()
        if self.engine is not None:
            sqlite_hot.detach(self.engine)
            await pg_hot.detach(self.engine)
            await self.engine.dispose()
            self.engine = None

    async def __aenter__(self) -> Accounts:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def is_admin(self, presented: str) -> bool:
        if self._admin_digest is None:
            return False
        return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), self._admin_digest)

    async def default_account(self) -> dict:
        account = await self.ledger.account_by_name(DEFAULT_ACCOUNT)
        if account is None:
            try:
                account = await self.ledger.create_account(DEFAULT_ACCOUNT, self.bootstrap.default_balance_pusd)
            except IntegrityError:  # another gateway starting at the same time made it first
                account = await self.ledger.account_by_name(DEFAULT_ACCOUNT)
                if account is None:
                    raise
                return account
            log.info("created the default account %s", account["id"])
        return account

    async def _ensure_bootstrap_key(self) -> None:
        key = self.bootstrap.api_key
        if not key:
            return
        if await self.keys.find(key) is not None:
            return
        account = await self.default_account()
        try:
            _, view = await self.keys.create(account["id"], "bootstrap", key=key)
        except IntegrityError:  # another gateway starting at the same time registered the same key first
            if await self.keys.find(key) is None:
                raise
            return
        # By id only: no part of a key goes to the logs (the banner shows it once, to whoever started us).
        log.info("registered the bootstrap key %s on the default account", view["id"])


def sqlite_path(database_url: str) -> str | None:
    """The file of a SQLite database URL; None for another database or an in-memory one."""
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[-1]
        if path and path != ":memory:":
            return path
    return None


def _default_data_dir(database_url: str) -> Path:
    path = sqlite_path(database_url)
    return Path("data") if path is None else Path(path).parent


async def _quietly(what: str, work: Awaitable[object]) -> None:
    try:
        await work
    except Exception:  # noqa: BLE001 - the database may be away; the next round retries
        log.warning("%s failed; retrying", what, exc_info=log.isEnabledFor(logging.DEBUG))
