"""API keys: issue, verify, list, revoke.

A key is shown once, when it is created. At rest only its SHA-256 digest and
a short public prefix are stored; verification hashes the presented key and
compares digests with `hmac.compare_digest`. Neither the key nor its digest
ever goes into a log line or an error message; the prefix may.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from flashserve.accounts.clock import utcnow
from flashserve.accounts.pricing import format_usd
from flashserve.accounts.reservations import NO_CAPS, SpendCaps
from flashserve.accounts.tables import ACCOUNT_LIMIT_COLUMNS, KEY_LIMIT_COLUMNS, accounts, api_keys

KEY_PREFIX = "sk-fs-"
_PUBLIC_CHARS = 12
PRINCIPAL_TTL_S = 1.0  # how long a verified key is trusted without reading its row again
_PRINCIPAL_CACHE_MAX = 10_000


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def public_prefix(key: str) -> str:
    """The part of a key that may appear in logs and listings."""
    return key[:_PUBLIC_CHARS]


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """The limits of one scope (a key, an account, or each end user of an account). None means unlimited."""

    max_concurrent: int | None = None
    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or unset")

    @property
    def unlimited(self) -> bool:
        return self.max_concurrent is None and self.rpm is None and self.tpm is None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the verified key and its account, with the limits of the key, of the account (all
    its keys together) and of each end user of the account (the requests' `user` field)."""

    key_id: str
    account_id: str
    prefix: str
    limits: KeyLimits
    account_limits: KeyLimits = KeyLimits()
    user_limits: KeyLimits = KeyLimits()
    caps: SpendCaps = NO_CAPS  # spending caps, counted with open reservations (reservations.py)


def key_view(row: Any) -> dict[str, Any]:
    """A key as listings show it: never the key itself, never its digest."""
    return {
        "id": row.id, "object": "api_key", "account_id": row.account_id, "name": row.name, "prefix": row.prefix,
        "created_at": _iso(row.created_at), "expires_at": _iso(row.expires_at), "revoked_at": _iso(row.revoked_at),
        "max_concurrent": row.max_concurrent, "rpm": row.rpm, "tpm": row.tpm,
        "daily_cap_usd": _usd(row.daily_cap_pusd), "monthly_cap_usd": _usd(row.monthly_cap_pusd),
    }


def _usd(pusd: int | None) -> str | None:
    return None if pusd is None else format_usd(int(pusd))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, account_id: str, name: str, expires_at: datetime | None = None,
                     limits: KeyLimits = KeyLimits(), key: str | None = None,
                     caps: SpendCaps = NO_CAPS) -> tuple[str, dict[str, Any]]:
        """Store a new key (or adopt `key`, for the operator's bootstrap key). Returns the plaintext
        key, to be shown once, and the stored view."""
        key = key or generate_key()
        values = {
            "id": "key_" + uuid.uuid4().hex[:20], "account_id": account_id, "name": name,
            "prefix": public_prefix(key), "digest": digest(key), "created_at": utcnow(), "expires_at": expires_at,
            "revoked_at": None, "max_concurrent": limits.max_concurrent, "rpm": limits.rpm, "tpm": limits.tpm,
            "daily_cap_pusd": caps.daily_pusd, "monthly_cap_pusd": caps.monthly_pusd,
        }
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(api_keys).values(**values))
        return key, key_view(_Obj(values))

    async def find(self, key: str) -> dict[str, Any] | None:
        row = await self._row_by_digest(digest(key))
        return None if row is None else key_view(row)

    async def verify(self, presented: str) -> Principal | None:
        """The principal behind a live key, or None (unknown, revoked or expired).

        A verified key is remembered for `PRINCIPAL_TTL_S`, so the request path reads no row for it: a change
        made through this process (revoke, limits, caps) forgets every remembered key at once; one made by
        another process (the `flashserve keys` CLI, another gateway on the same database) takes effect within
        the TTL. Unknown, revoked and expired keys are never remembered, and a remembered key's expiry is
        checked on every use."""
        presented_digest = digest(presented)
        memory = _principals(self.engine)
        hit = memory.keys.get(presented_digest)
        if hit is not None:
            principal, expires_at, fetched = hit
            if time.monotonic() - fetched < PRINCIPAL_TTL_S and (expires_at is None or expires_at > utcnow()):
                return principal
            del memory.keys[presented_digest]
        # One read per key however many requests miss at once: when the second ran out under load, every
        # request in flight read the row together (a burst of new pooled connections: a 100 ms stall).
        flight = memory.flights.get(presented_digest)
        if flight is None:
            flight = memory.flights[presented_digest] = asyncio.ensure_future(self._remember(presented_digest))
        # Shielded: one client's disconnect does not cancel the read the others wait on.
        return await asyncio.shield(flight)

    async def _remember(self, presented_digest: str) -> Principal | None:
        memory = _principals(self.engine)
        generation = memory.generation
        try:
            found = await self._verify(presented_digest)
        finally:
            memory.flights.pop(presented_digest, None)
        if found is None:
            return None
        if memory.generation == generation:  # nothing changed here while it was read
            if len(memory.keys) >= _PRINCIPAL_CACHE_MAX:
                memory.keys.clear()
            memory.keys[presented_digest] = found[0], found[1], time.monotonic()
        return found[0]

    async def _verify(self, presented_digest: str) -> tuple[Principal, datetime | None] | None:
        """The principal behind a live key and the key's expiry, read from the database."""
        query = (sa.select(api_keys, *(accounts.c[c].label(f"account_{c}") for c in ACCOUNT_LIMIT_COLUMNS))
                 .join(accounts, accounts.c.id == api_keys.c.account_id)
                 .where(api_keys.c.digest == presented_digest))
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None or not hmac.compare_digest(row.digest, presented_digest):
            return None
        now = utcnow()
        if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
            return None
        account = {c: getattr(row, f"account_{c}") for c in ACCOUNT_LIMIT_COLUMNS}
        return Principal(row.id, row.account_id, row.prefix, KeyLimits(row.max_concurrent, row.rpm, row.tpm),
                         KeyLimits(account["max_concurrent"], account["rpm"], account["tpm"]),
                         KeyLimits(account["user_max_concurrent"], account["user_rpm"], account["user_tpm"]),
                         SpendCaps(_int(row.daily_cap_pusd), _int(row.monthly_cap_pusd))), row.expires_at

    async def set_limits(self, key_id: str, changes: dict[str, int | None]) -> dict[str, Any] | None:
        """Change some of a key's limits (None: unlimited); the key's view, or None when there is no such key."""
        unknown = set(changes) - set(KEY_LIMIT_COLUMNS)
        if unknown:
            raise ValueError(f"not a key limit: {sorted(unknown)}")
        if changes:
            async with self.engine.begin() as conn:
                await conn.execute(sa.update(api_keys).where(api_keys.c.id == key_id).values(**changes))
            forget_principals(self.engine)
        return await self.get(key_id)

    async def _row_by_digest(self, key_digest: str) -> Any:
        async with self.engine.connect() as conn:
            result = await conn.execute(sa.select(api_keys).where(api_keys.c.digest == key_digest))
            return result.first()

    async def list(self, account_id: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at)
        if account_id is not None:
            query = query.where(api_keys.c.account_id == account_id)
        async with self.engine.connect() as conn:
            return [key_view(row) for row in await conn.execute(query)]

    async def get(self, key_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id))).first()
        return None if row is None else key_view(row)

    async def set_caps(self, key_id: str, caps: SpendCaps) -> dict[str, Any] | None:
        """Replace a key's spending caps (None in a field: no cap); they apply from the key's next request."""
        async with self.engine.begin() as conn:
            await conn.execute(sa.update(api_keys).where(api_keys.c.id == key_id)
                               .values(daily_cap_pusd=caps.daily_pusd, monthly_cap_pusd=caps.monthly_pusd))
        forget_principals(self.engine)
        return await self.get(key_id)

    async def revoke(self, key_id: str) -> dict[str, Any] | None:
        async with self.engine.begin() as conn:
            await conn.execute(sa.update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                               .values(revoked_at=utcnow()))
        forget_principals(self.engine)
        return await self.get(key_id)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


class _Obj:
    """Attribute access over a dict, so a freshly inserted row renders like a fetched one."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


class _Memory:
    """This process's remembered keys of one database, by digest (never the key itself), and the reads in
    flight; `generation` counts the changes made here, so a read that began before one is not remembered."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[Principal, datetime | None, float]] = {}  # principal, expiry, when read
        self.flights: dict[str, asyncio.Future[Principal | None]] = {}
        self.generation = 0


_PRINCIPALS: weakref.WeakKeyDictionary[AsyncEngine, _Memory] = weakref.WeakKeyDictionary()


def _principals(engine: AsyncEngine) -> _Memory:
    memory = _PRINCIPALS.get(engine)
    if memory is None:
        memory = _PRINCIPALS[engine] = _Memory()
    return memory


def forget_principals(engine: AsyncEngine) -> None:
    """Drop every remembered key of this database: a key or an account changed here."""
    memory = _principals(engine)
    memory.keys.clear()
    memory.flights.clear()  # a read in flight finishes for its waiters but is not remembered
    memory.generation += 1
