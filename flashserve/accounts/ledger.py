"""Accounts, balances and the usage ledger.

Every request that reached a model leaves exactly one usage row, and the
same database transaction debits the account, so a crash keeps both or
neither. Balances change only by SQL arithmetic on the row (`balance =
balance - cost`), never by read-modify-write in Python, so concurrent
requests cannot lose an update. Opening balances are top-ups too, which
keeps one audit identity true at all times:

    balance = Σ top-ups − Σ usage costs
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from flashserve.accounts.clock import utcnow
from flashserve.accounts.pricing import format_usd
from flashserve.accounts.tables import ACCOUNT_LIMIT_COLUMNS, accounts, api_keys, topups, usage_records

STATUSES = ("ok", "error", "cancelled")
GROUPINGS = ("key", "model", "day")


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    account_id: str
    key_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_pusd: int
    status: str
    latency_ms: int
    created_at: datetime = field(default_factory=utcnow)
    x_request_id: str | None = None  # the HTTP request's correlation id (migration 0005; None in older rows)

    def __post_init__(self) -> None:
        # Checked with real errors, not asserts: `python -O` must not let a bad row reach the ledger.
        if self.status not in STATUSES:
            raise ValueError(f"usage status must be one of {STATUSES}, not {self.status!r}")
        if not 0 <= self.cached_tokens <= self.prompt_tokens:
            raise ValueError(f"cached_tokens {self.cached_tokens} outside [0, prompt_tokens {self.prompt_tokens}]")
        if not 0 <= self.reasoning_tokens <= self.completion_tokens:
            raise ValueError(f"reasoning_tokens {self.reasoning_tokens} outside "
                             f"[0, completion_tokens {self.completion_tokens}]")
        if self.cost_pusd < 0 or self.latency_ms < 0:
            raise ValueError("cost_pusd and latency_ms must not be negative")


def account_view(row: Any) -> dict[str, Any]:
    """An account with its balance and its limits (all its keys together; `user_*`: each end user's)."""
    return {"id": row.id, "object": "account", "name": row.name, "balance_pusd": int(row.balance_pusd),
            "balance_usd": format_usd(int(row.balance_pusd)), "created_at": row.created_at.isoformat() + "Z",
            **{column: getattr(row, column) for column in ACCOUNT_LIMIT_COLUMNS}}


class Ledger:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- accounts --------------------------------------------------------------------
    async def create_account(self, name: str, balance_pusd: int = 0) -> dict[str, Any]:
        account_id = "acct_" + uuid.uuid4().hex[:20]
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(accounts).values(id=account_id, name=name, balance_pusd=0,
                                                          created_at=utcnow()))
            if balance_pusd:
                await self._top_up(conn, account_id, balance_pusd, "opening balance")
        account = await self.get_account(account_id)
        if account is None:
            raise RuntimeError(f"account {account_id} vanished right after it was created")
        return account

    async def get_account(self, account_id: str) -> dict[str, Any] | None:
        return await self._one(sa.select(accounts).where(accounts.c.id == account_id))

    async def account_by_name(self, name: str) -> dict[str, Any] | None:
        return await self._one(sa.select(accounts).where(accounts.c.name == name))

    async def list_accounts(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(accounts).order_by(accounts.c.created_at))
            return [account_view(row) for row in rows]

    async def set_limits(self, account_id: str, changes: dict[str, int | None]) -> dict[str, Any] | None:
        """Change some of an account's limits (None: unlimited); the account, or None when there is none."""
        unknown = set(changes) - set(ACCOUNT_LIMIT_COLUMNS)
        if unknown:
            raise ValueError(f"not an account limit: {sorted(unknown)}")
        if changes:
            async with self.engine.begin() as conn:
                await conn.execute(sa.update(accounts).where(accounts.c.id == account_id).values(**changes))
        return await self.get_account(account_id)

    async def balance(self, account_id: str) -> int | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(sa.select(accounts.c.balance_pusd).where(accounts.c.id == account_id))
        return None if value is None else int(value)

    async def top_up(self, account_id: str, amount_pusd: int, note: str = "") -> dict[str, Any] | None:
        async with self.engine.begin() as conn:
            exists = await conn.scalar(sa.select(accounts.c.id).where(accounts.c.id == account_id))
            if exists is None:
                return None
            await self._top_up(conn, account_id, amount_pusd, note)
        return await self.get_account(account_id)

    @staticmethod
    async def _top_up(conn: Any, account_id: str, amount_pusd: int, note: str) -> None:
        await conn.execute(sa.insert(topups).values(account_id=account_id, amount_pusd=amount_pusd, note=note,
                                                    created_at=utcnow()))
        await conn.execute(sa.update(accounts).where(accounts.c.id == account_id)
                           .values(balance_pusd=accounts.c.balance_pusd + amount_pusd))

    async def _one(self, query: sa.Select) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else account_view(row)

    # -- usage -----------------------------------------------------------------------
    async def record(self, rec: UsageRecord) -> None:
        """Write the usage row and debit the account, atomically."""
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(usage_records).values(**asdict(rec)))
            await conn.execute(sa.update(accounts).where(accounts.c.id == rec.account_id)
                               .values(balance_pusd=accounts.c.balance_pusd - rec.cost_pusd))

    async def records(self, account_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(usage_records).order_by(usage_records.c.id.desc()).limit(limit)
        if account_id is not None:
            query = query.where(usage_records.c.account_id == account_id)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query)
            return [_record_view(row) for row in rows]

    async def audit(self, account_id: str) -> dict[str, int]:
        """The balance next to what the ledger says it should be."""
        async with self.engine.connect() as conn:
            balance = await conn.scalar(sa.select(accounts.c.balance_pusd).where(accounts.c.id == account_id))
            credited = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(topups.c.amount_pusd), 0))
                                         .where(topups.c.account_id == account_id))
            spent = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(usage_records.c.cost_pusd), 0))
                                      .where(usage_records.c.account_id == account_id))
        return {"balance_pusd": int(balance or 0), "topups_pusd": int(credited), "spent_pusd": int(spent)}

    async def report(self, account_id: str | None = None, start: datetime | None = None,
                     end: datetime | None = None, group_by: str = "day") -> list[dict[str, Any]]:
        """Usage grouped by key, model or day, within [start, end)."""
        if group_by not in GROUPINGS:
            raise ValueError(f"group_by must be one of {GROUPINGS}, not {group_by!r}")
        u = usage_records.c
        group = {"key": u.key_id, "model": u.model, "day": sa.func.date(u.created_at)}[group_by]
        query = sa.select(
            group.label("group"),
            sa.func.count().label("requests"),
            sa.func.sum(u.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(u.cached_tokens).label("cached_tokens"),
            sa.func.sum(u.completion_tokens).label("completion_tokens"),
            sa.func.sum(u.reasoning_tokens).label("reasoning_tokens"),
            sa.func.sum(u.cost_pusd).label("cost_pusd"),
        ).group_by(group).order_by(group)
        if account_id is not None:
            query = query.where(u.account_id == account_id)
        if start is not None:
            query = query.where(u.created_at >= start)
        if end is not None:
            query = query.where(u.created_at < end)
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
            names = {}
            if group_by == "key":
                keys = await conn.execute(sa.select(api_keys.c.id, api_keys.c.name, api_keys.c.prefix))
                names = {k.id: (k.name, k.prefix) for k in keys}
        out = []
        for row in rows:
            prompt, cached = int(row.prompt_tokens or 0), int(row.cached_tokens or 0)
            completion, cost = int(row.completion_tokens or 0), int(row.cost_pusd or 0)
            entry = {
                "group": str(row.group), "requests": int(row.requests), "prompt_tokens": prompt,
                "cached_tokens": cached, "completion_tokens": completion,
                "reasoning_tokens": int(row.reasoning_tokens or 0), "total_tokens": prompt + completion,
                "cache_hit_ratio": round(cached / prompt, 6) if prompt else 0.0,
                "cost_pusd": cost, "cost_usd": format_usd(cost),
            }
            if group_by == "key" and str(row.group) in names:
                entry["key_name"], entry["key_prefix"] = names[str(row.group)]
            out.append(entry)
        return out


def _record_view(row: Any) -> dict[str, Any]:
    return {
        "request_id": row.request_id, "account_id": row.account_id, "key_id": row.key_id, "model": row.model,
        "prompt_tokens": row.prompt_tokens, "cached_tokens": row.cached_tokens,
        "completion_tokens": row.completion_tokens, "reasoning_tokens": row.reasoning_tokens,
        "cost_pusd": int(row.cost_pusd), "cost_usd": format_usd(int(row.cost_pusd)), "status": row.status,
        "latency_ms": row.latency_ms, "created_at": row.created_at.isoformat() + "Z",
        "x_request_id": row.x_request_id,
    }
