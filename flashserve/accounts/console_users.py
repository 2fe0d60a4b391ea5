"""Console users who sign in with a name and a password (optional self-service onboarding).

A password is stored only as an scrypt hash (memory-hard; `hashlib.scrypt`, n=2**14, r=8, p=1: 16 MiB per
check), with a random salt, in the self-describing form `scrypt$n$r$p$salt$hash` so the cost can be raised
later. Registering creates the user's account (with the configured granted balance) and one key, named
"console", that the console bills the user's playground to; that key's plaintext is discarded at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from flashserve.accounts.clock import utcnow
from flashserve.accounts.keys import KeyStore
from flashserve.accounts.ledger import Ledger
from flashserve.accounts.tables import console_users

_N, _R, _P = 2**14, 8, 1
MIN_PASSWORD = 8


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    derived = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(derived).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        derived = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                 dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(derived, base64.b64decode(expected))


# Compared against when the name is unknown, so a wrong name costs the same time as a wrong password.
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    id: str
    name: str
    account_id: str
    key_id: str


class ConsoleUsers:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def register(self, name: str, password: str, granted_pusd: int) -> ConsoleUser:
        """A new user, their account and their console key. ValueError: name taken or password too short."""
        if len(password) < MIN_PASSWORD:
            raise ValueError(f"The password must have at least {MIN_PASSWORD} characters.")
        if await self._row(name) is not None or await Ledger(self.engine).account_by_name(name) is not None:
            raise ValueError(f"The name '{name}' is taken.")
        password_hash = hash_password(password)
        account = await Ledger(self.engine).create_account(name, granted_pusd)
        _, key = await KeyStore(self.engine).create(account["id"], "console")
        user = ConsoleUser("user_" + uuid.uuid4().hex[:20], name, account["id"], key["id"])
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(console_users).values(
                id=user.id, name=name, password_hash=password_hash, account_id=user.account_id,
                key_id=user.key_id, created_at=utcnow()))
        return user

    async def authenticate(self, name: str, password: str) -> ConsoleUser | None:
        row = await self._row(name)
        if row is None:
            check_password(password, _DUMMY_HASH)
            return None
        if not check_password(password, row.password_hash):
            return None
        key_id = row.key_id
        key = await KeyStore(self.engine).get(key_id)
        if key is None or key["revoked_at"] is not None:  # the user revoked their console key: a fresh one
            _, fresh = await KeyStore(self.engine).create(row.account_id, "console")
            key_id = fresh["id"]
            async with self.engine.begin() as conn:
                await conn.execute(sa.update(console_users).where(console_users.c.id == row.id).values(key_id=key_id))
        return ConsoleUser(row.id, row.name, row.account_id, key_id)

    async def _row(self, name: str) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(sa.select(console_users).where(console_users.c.name == name))).first()
