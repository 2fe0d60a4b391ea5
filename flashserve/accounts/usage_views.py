"""Read-only usage views the console shows: recent requests within a date range, one request by id, and
per-key activity (last used, this month's requests and cost). Always filtered by account unless the
caller (an admin view) passes None."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from flashserve.accounts.pricing import format_usd
from flashserve.accounts.tables import api_keys, topups, usage_records


def _view(row: Any, key_names: dict[str, str]) -> dict[str, Any]:
    return {
        "request_id": row.request_id, "account_id": row.account_id, "key_id": row.key_id,
        "key_name": key_names.get(row.key_id, ""), "model": row.model, "prompt_tokens": row.prompt_tokens,
        "cached_tokens": row.cached_tokens, "completion_tokens": row.completion_tokens,
        "reasoning_tokens": row.reasoning_tokens, "cost_pusd": int(row.cost_pusd),
        "cost_usd": format_usd(int(row.cost_pusd)), "status": row.status, "latency_ms": row.latency_ms,
        "created_at": row.created_at.isoformat(timespec="seconds") + "Z",
    }


class UsageViews:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def records(self, account_id: str | None, start: datetime | None = None, end: datetime | None = None,
                      limit: int = 200) -> list[dict[str, Any]]:
        """Usage rows, newest first, within [start, end)."""
        u = usage_records.c
        query = sa.select(usage_records).order_by(u.id.desc()).limit(limit)
        if account_id is not None:
            query = query.where(u.account_id == account_id)
        if start is not None:
            query = query.where(u.created_at >= start)
        if end is not None:
            query = query.where(u.created_at < end)
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(query))
            names = await self._key_names(conn, {r.key_id for r in rows})
        return [_view(r, names) for r in rows]

    async def record(self, account_id: str, request_id: str) -> dict[str, Any] | None:
        """One of the account's usage rows by its object id (chatcmpl-...) or by the HTTP request's
        `x-request-id`, the newest if a client reused one (None for another account's)."""
        u = usage_records.c
        query = (sa.select(usage_records)
                 .where(u.account_id == account_id, sa.or_(u.request_id == request_id, u.x_request_id == request_id))
                 .order_by(u.id.desc()).limit(1))
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
            names = await self._key_names(conn, {row.key_id} if row else set())
        return None if row is None else _view(row, names)

    async def key_activity(self, account_id: str | None, since: datetime) -> dict[str, dict[str, Any]]:
        """key id -> last used (any time), requests and cost since `since`."""
        u = usage_records.c
        month = sa.case((u.created_at >= since, 1), else_=0)
        query = sa.select(u.key_id, sa.func.max(u.created_at).label("last"), sa.func.sum(month).label("requests"),
                          sa.func.sum(sa.case((u.created_at >= since, u.cost_pusd), else_=0)).label("cost")
                          ).group_by(u.key_id)
        if account_id is not None:
            query = query.where(u.account_id == account_id)
        async with self.engine.connect() as conn:
            rows = await conn.execute(query)
            return {r.key_id: {"last_used": r.last.isoformat(timespec="seconds") + "Z",
                               "month_requests": int(r.requests or 0),
                               "month_cost_usd": format_usd(int(r.cost or 0))} for r in rows}

    async def topups(self, account_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """The account's credits (opening balance, admin top-ups, redeemed codes), newest first."""
        query = (sa.select(topups).where(topups.c.account_id == account_id).order_by(topups.c.id.desc())
                 .limit(limit))
        async with self.engine.connect() as conn:
            return [{"amount_usd": format_usd(int(r.amount_pusd)), "note": r.note,
                     "created_at": r.created_at.isoformat(timespec="seconds") + "Z"}
                    for r in await conn.execute(query)]

    @staticmethod
    async def _key_names(conn: Any, ids: set[str]) -> dict[str, str]:
        if not ids:
            return {}
        rows = await conn.execute(sa.select(api_keys.c.id, api_keys.c.name, api_keys.c.prefix)
                                  .where(api_keys.c.id.in_(ids)))
        return {r.id: f"{r.name} ({r.prefix}…)" for r in rows}
