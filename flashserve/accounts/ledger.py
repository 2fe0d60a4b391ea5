"""Accounts, balances, credits and the usage ledger.

Every request that reached a model leaves exactly one usage row, and the
same database transaction debits the account (`reservations.py: settle`),
so a crash keeps both or neither. Balances change only by SQL arithmetic on
the row (`balance = balance - cost`), never by read-modify-write in Python,
so concurrent requests cannot lose an update. Credits are top-ups (paid) or
grants (promotional, spent first: `granted_pusd`); opening balances are
credits too, which keeps one audit identity true at all times:

    balance + reserved + Σ usage costs = Σ credits
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from flashserve.accounts.clock import utcnow
from flashserve.accounts.keys import forget_principals
from flashserve.accounts.pricing import format_usd
from flashserve.accounts.reservations import STATUSES, audit, check_usage
from flashserve.accounts.tables import ACCOUNT_LIMIT_COLUMNS, accounts, api_keys, topups, usage_records

__all__ = ["STATUSES", "CREDIT_KINDS", "GROUPINGS", "Ledger", "UsageRecord", "account_view"]
CREDIT_KINDS = ("topup", "grant")
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
        check_usage(self)


def account_view(row: Any) -> dict[str, Any]:
    """balance: free to spend now; reserved: held for requests in flight; granted: the promotional part of
    balance + reserved (spent first), the rest being topped up."""
    balance, reserved, granted = int(row.balance_pusd), int(row.reserved_pusd), int(row.granted_pusd)
    return {"id": row.id, "object": "account", "name": row.name, "balance_pusd": balance,
            "balance_usd": format_usd(balance), "reserved_pusd": reserved, "reserved_usd": format_usd(reserved),
            "granted_pusd": granted, "granted_usd": format_usd(granted),
            "topped_up_pusd": balance + reserved - granted, "topped_up_usd": format_usd(balance + reserved - granted),
            "created_at": row.created_at.isoformat() + "Z",
            # Limits of all its keys together, and of each end user (`user_*`).
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
            forget_principals(self.engine)  # a remembered key carries its account's limits
        return await self.get_account(account_id)

    async def balance(self, account_id: str) -> int | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(sa.select(accounts.c.balance_pusd).where(accounts.c.id == account_id))
        return None if value is None else int(value)

    async def top_up(self, account_id: str, amount_pusd: int, note: str = "",
                     kind: str = "topup") -> dict[str, Any] | None:
        """Credit the account: a paid top-up, or (`kind="grant"`) promotional credit, spent first."""
        async with self.engine.begin() as conn:
            exists = await conn.scalar(sa.select(accounts.c.id).where(accounts.c.id == account_id))
            if exists is None:
                return None
            await self._top_up(conn, account_id, amount_pusd, note, kind)
        return await self.get_account(account_id)

    async def grant(self, account_id: str, amount_pusd: int, note: str = "") -> dict[str, Any] | None:
        return await self.top_up(account_id, amount_pusd, note, kind="grant")

    @staticmethod
    async def _top_up(conn: Any, account_id: str, amount_pusd: int, note: str, kind: str = "topup") -> None:
        if kind not in CREDIT_KINDS:
            raise ValueError(f"credit kind must be one of {CREDIT_KINDS}, not {kind!r}")
        await conn.execute(sa.insert(topups).values(account_id=account_id, amount_pusd=amount_pusd, note=note,
                                                    kind=kind, created_at=utcnow()))
        granted = amount_pusd if kind == "grant" else 0
        await conn.execute(sa.update(accounts).where(accounts.c.id == account_id)
                           .values(balance_pusd=accounts.c.balance_pusd + amount_pusd,
                                   granted_pusd=accounts.c.granted_pusd + granted))

    async def _one(self, query: sa.Select) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else account_view(row)

    # -- usage -----------------------------------------------------------------------
    async def record(self, rec: UsageRecord) -> None:
        """Write a usage row and debit the account, atomically, without a reservation (tools and tests;
        served requests settle their reservation instead: `reservations.py: Reservations.settle`)."""
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(usage_records).values(**asdict(rec)))
            a = accounts.c
            await conn.execute(sa.update(accounts).where(a.id == rec.account_id).values(
                balance_pusd=a.balance_pusd - rec.cost_pusd,
                granted_pusd=sa.case((a.granted_pusd > rec.cost_pusd, a.granted_pusd - rec.cost_pusd), else_=0)))

    async def records(self, account_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(usage_records).order_by(usage_records.c.id.desc()).limit(limit)
        if account_id is not None:
            query = query.where(usage_records.c.account_id == account_id)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query)
            return [_record_view(row) for row in rows]

    async def audit(self, account_id: str) -> dict[str, Any]:
        """The balance next to what the ledger says it should be (`reservations.py: audit`), with the older
        names kept: topups_pusd (Σ credits) and spent_pusd (Σ charges)."""
        [row] = await audit(self.engine, account_id)
        return {**row, "topups_pusd": row["credits_pusd"], "spent_pusd": row["charges_pusd"]}

    async def audit_all(self) -> list[dict[str, Any]]:
        return await audit(self.engine)

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
