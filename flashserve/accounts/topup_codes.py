"""Top-up codes: single-use codes worth an amount, the offline way a self-hosted provider sells credit.

An admin makes a batch (`create_batch`): N codes of one amount, each shown once. Only a code's SHA-256
digest and a short public prefix are stored, as for API keys. `redeem` credits the code's amount to an
account exactly once: one transaction marks the code redeemed (an UPDATE that matches only an unredeemed
code, so two concurrent redemptions cannot both win), writes the `topups` row that is the audit trail, and
raises the balance by SQL arithmetic. A code that is unknown or already used credits nothing.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from flashserve.accounts.clock import utcnow
from flashserve.accounts.pricing import format_usd
from flashserve.accounts.tables import accounts, topup_codes, topups

CODE_PREFIX = "fs-topup-"
MAX_BATCH = 1000


def _digest(code: str) -> str:
    return hashlib.sha256(code.strip().encode()).hexdigest()


class RedeemError(ValueError):
    """The code is unknown or already redeemed (the message says which, never the code itself)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Redeemed:
    account_id: str
    amount_pusd: int
    code_id: str


def code_view(row: Any) -> dict[str, Any]:
    return {"id": row.id, "batch_id": row.batch_id, "prefix": row.prefix, "amount_pusd": int(row.amount_pusd),
            "amount_usd": format_usd(int(row.amount_pusd)), "note": row.note,
            "created_at": row.created_at.isoformat() + "Z",
            "redeemed_at": None if row.redeemed_at is None else row.redeemed_at.isoformat() + "Z",
            "redeemed_by": row.redeemed_by}


class TopUpCodes:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create_batch(self, count: int, amount_pusd: int, note: str = "") -> tuple[str, list[str]]:
        """`count` new codes worth `amount_pusd` each; returns the batch id and the plaintext codes (shown
        once: only their digests are stored)."""
        if not 1 <= count <= MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} codes")
        if amount_pusd <= 0:
            raise ValueError("a code must be worth a positive amount")
        batch = "batch_" + uuid.uuid4().hex[:16]
        codes = [CODE_PREFIX + secrets.token_urlsafe(18) for _ in range(count)]
        now = utcnow()
        rows = [{"id": "code_" + uuid.uuid4().hex[:20], "batch_id": batch, "digest": _digest(c),
                 "prefix": c[:len(CODE_PREFIX) + 4], "amount_pusd": amount_pusd, "note": note, "created_at": now}
                for c in codes]
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(topup_codes), rows)
        return batch, codes

    async def redeem(self, code: str, account_id: str) -> Redeemed:
        """Credit the code's amount to `account_id`, once; RedeemError when it is unknown or used."""
        digest = _digest(code)
        now = utcnow()
        async with self.engine.begin() as conn:
            row = (await conn.execute(sa.select(topup_codes).where(topup_codes.c.digest == digest))).first()
            if row is None:
                raise RedeemError("That top-up code is not valid.", "invalid_code")
            claimed = await conn.execute(
                sa.update(topup_codes).where(topup_codes.c.id == row.id, topup_codes.c.redeemed_at.is_(None))
                .values(redeemed_at=now, redeemed_by=account_id))
            if claimed.rowcount != 1:
                raise RedeemError("That top-up code has already been redeemed.", "code_already_redeemed")
            result = await conn.execute(sa.insert(topups).values(
                account_id=account_id, amount_pusd=row.amount_pusd, note=f"top-up code {row.prefix}… ({row.batch_id})",
                created_at=now))
            topup_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
            await conn.execute(sa.update(topup_codes).where(topup_codes.c.id == row.id).values(topup_id=topup_id))
            await conn.execute(sa.update(accounts).where(accounts.c.id == account_id)
                               .values(balance_pusd=accounts.c.balance_pusd + row.amount_pusd))
        return Redeemed(account_id, int(row.amount_pusd), row.id)

    async def batches(self) -> list[dict[str, Any]]:
        """Each batch: its amount, note, how many codes and how many are redeemed, newest first."""
        c = topup_codes.c
        query = (sa.select(c.batch_id, sa.func.min(c.amount_pusd).label("amount_pusd"),
                           sa.func.min(c.note).label("note"), sa.func.min(c.created_at).label("created_at"),
                           sa.func.count().label("codes"), sa.func.count(c.redeemed_at).label("redeemed"))
                 .group_by(c.batch_id).order_by(sa.func.min(c.created_at).desc()))
        async with self.engine.connect() as conn:
            return [{"batch_id": r.batch_id, "amount_usd": format_usd(int(r.amount_pusd)), "note": r.note,
                     "created_at": r.created_at.isoformat() + "Z", "codes": int(r.codes),
                     "redeemed": int(r.redeemed)} for r in await conn.execute(query)]

    async def codes(self, batch_id: str) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(topup_codes).where(topup_codes.c.batch_id == batch_id)
                                      .order_by(topup_codes.c.id))
            return [code_view(r) for r in rows]
