"""The accounts layer as one object the server holds: database, keys, ledger and
rate limiter, plus the start-up work (migrations, the default account and the
bootstrap key)."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from flashserve.accounts.console_users import ConsoleUsers
from flashserve.accounts.db import create_engine, migrate
from flashserve.accounts.keys import KeyStore
from flashserve.accounts.ledger import Ledger
from flashserve.accounts.limits import Limiter, MemoryLimiter
from flashserve.accounts.stored_responses import ResponseStore
from flashserve.accounts.topup_codes import TopUpCodes
from flashserve.accounts.usage_views import UsageViews

log = logging.getLogger(__name__)
DEFAULT_ACCOUNT = "default"


@dataclass(slots=True)
class Bootstrap:
    """Keys and balances the server makes sure exist when it starts."""

    api_key: str | None = None  # becomes an ordinary key of the default account
    admin_key: str | None = None
    default_balance_pusd: int = 0


class Accounts:
    def __init__(self, database_url: str, bootstrap: Bootstrap | None = None, limiter: Limiter | None = None) -> None:
        self.database_url = database_url
        self.bootstrap = bootstrap or Bootstrap()
        self.engine: AsyncEngine | None = None
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
        await self._ensure_bootstrap_key()

    async def close(self) -> None:
        await self.limiter.close()
        if self.engine is not None:
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
            account = await self.ledger.create_account(DEFAULT_ACCOUNT, self.bootstrap.default_balance_pusd)
            log.info("created the default account %s", account["id"])
        return account

    async def _ensure_bootstrap_key(self) -> None:
        key = self.bootstrap.api_key
        if not key:
            return
        if await self.keys.find(key) is not None:
            return
        account = await self.default_account()
        _, view = await self.keys.create(account["id"], "bootstrap", key=key)
        # By id only: no part of a key goes to the logs (the banner shows it once, to whoever started us).
        log.info("registered the bootstrap key %s on the default account", view["id"])
