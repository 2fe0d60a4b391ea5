"""A signed-in account's pages: its keys (create, revoke, set limits), its usage (charts, recent requests,
a date range, CSV export), its balance and redeeming a top-up code. Every query is filtered by the
session's account: another account's keys or usage are never read here."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.responses import Response

from flashserve.accounts.clock import utcnow
from flashserve.accounts.keys import KeyLimits
from flashserve.accounts.pricing import format_usd
from flashserve.accounts.topup_codes import RedeemError
from flashserve.api.console.web import Ctx, context, form, need_account, render
from flashserve.api.state import app_state

router = APIRouter(prefix="/console")
Context = Annotated[Ctx, Depends(context)]
LIMIT_FIELDS = ("max_concurrent", "rpm", "tpm")


def month_start() -> datetime:
    now = utcnow()
    return datetime(now.year, now.month, 1)


async def _keys_page(ctx: Ctx, account_id: str, status: int = 200, new_key: dict[str, Any] | None = None,
                     error: str | None = None) -> Response:
    accounts = app_state(ctx.request).accounts
    keys = await accounts.keys.list(account_id)
    activity = await accounts.usage_views.key_activity(account_id, month_start())
    return render(ctx, "keys.html", status=status, title="API keys", keys=keys, activity=activity,
                  new_key=new_key, error=error)


@router.get("/keys", include_in_schema=False)
async def keys_page(ctx: Context) -> Response:
    return await _keys_page(ctx, need_account(ctx))


@router.post("/keys", include_in_schema=False)
async def create_key(ctx: Context) -> Response:
    account_id = need_account(ctx)
    fields = await form(ctx)
    name = fields.get("name", "").strip() or "key"
    try:
        limits = _limits(fields)
    except ValueError as exc:
        return await _keys_page(ctx, account_id, 400, error=str(exc))
    key, view = await app_state(ctx.request).accounts.keys.create(account_id, name[:200], limits=limits)
    return await _keys_page(ctx, account_id, 201, new_key={**view, "key": key})


def _limits(fields: dict[str, str]) -> KeyLimits:
    values: dict[str, int | None] = {}
    for name in LIMIT_FIELDS:
        raw = fields.get(name, "").strip()
        if not raw:
            values[name] = None
            continue
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"'{name}' must be a positive whole number, or empty for no limit.")
        values[name] = int(raw)
    return KeyLimits(**values)


async def _own_key(ctx: Ctx, account_id: str, key_id: str) -> dict[str, Any] | None:
    key = await app_state(ctx.request).accounts.keys.get(key_id)
    return key if key is not None and key["account_id"] == account_id else None


@router.post("/keys/{key_id}/revoke", include_in_schema=False)
async def revoke_key(key_id: str, ctx: Context) -> Response:
    account_id = need_account(ctx)
    await form(ctx)
    if await _own_key(ctx, account_id, key_id) is None:
        return await _keys_page(ctx, account_id, 404, error=f"No key '{key_id}' in this account.")
    await app_state(ctx.request).accounts.keys.revoke(key_id)
    if key_id == ctx.session.key_id:  # the key this session runs on: the session ends with it
        return render(ctx, "error.html", title="Signed out",
                      message="You revoked the key you signed in with, so this session is over.")
    return await _keys_page(ctx, account_id)


@router.post("/keys/{key_id}/limits", include_in_schema=False)
async def set_limits(key_id: str, ctx: Context) -> Response:
    account_id = need_account(ctx)
    fields = await form(ctx)
    if await _own_key(ctx, account_id, key_id) is None:
        return await _keys_page(ctx, account_id, 404, error=f"No key '{key_id}' in this account.")
    try:
        limits = _limits(fields)
    except ValueError as exc:
        return await _keys_page(ctx, account_id, 400, error=str(exc))
    await app_state(ctx.request).accounts.keys.set_limits(
        key_id, {"max_concurrent": limits.max_concurrent, "rpm": limits.rpm, "tpm": limits.tpm})
    return await _keys_page(ctx, account_id)


# -- usage -----------------------------------------------------------------------------------------------
def date_range(start: str | None, end: str | None) -> tuple[str, str, datetime, datetime]:
    """The page's [from, to] dates (inclusive days, default: the last 30) and the [start, end) instants."""
    today = datetime.now(UTC).date()
    try:
        first = datetime.fromisoformat(start).date() if start else today - timedelta(days=29)
        last = datetime.fromisoformat(end).date() if end else today
    except ValueError:
        first, last = today - timedelta(days=29), today
    if first > last:
        first, last = last, first
    begin = datetime(first.year, first.month, first.day)
    return first.isoformat(), last.isoformat(), begin, datetime(last.year, last.month, last.day) + timedelta(days=1)


async def usage_data(ctx: Ctx, account_id: str | None, start: str | None, end: str | None) -> dict[str, Any]:
    """The usage page's numbers for `account_id` (None: every account, for the admin)."""
    accounts = app_state(ctx.request).accounts
    first, last, begin, finish = date_range(start, end)
    by_day = _every_day(await accounts.ledger.report(account_id, begin, finish, "day"), begin, finish)
    by_model = await accounts.ledger.report(account_id, begin, finish, "model")
    records = await accounts.usage_views.records(account_id, begin, finish, limit=200)
    total = sum(row["cost_pusd"] for row in by_day)
    return {"from": first, "to": last, "by_day": by_day, "by_model": by_model, "records": records,
            "total_cost_usd": format_usd(total), "total_requests": sum(row["requests"] for row in by_day)}


def _every_day(rows: list[dict[str, Any]], begin: datetime, finish: datetime) -> list[dict[str, Any]]:
    """The report's days with the empty ones between filled in as zeros, so a chart spans the whole range."""
    seen = {row["group"]: row for row in rows}
    out = []
    day = begin
    while day < finish and len(out) < 3660:
        key = day.date().isoformat()
        out.append(seen.get(key) or {"group": key, "requests": 0, "prompt_tokens": 0, "cached_tokens": 0,
                                     "completion_tokens": 0, "reasoning_tokens": 0, "total_tokens": 0,
                                     "cache_hit_ratio": 0.0, "cost_pusd": 0, "cost_usd": "0"})
        day += timedelta(days=1)
    return out


@router.get("/usage", include_in_schema=False)
async def usage_page(ctx: Context) -> Response:
    return await _usage_page(ctx, ctx.request.query_params.get("from"), ctx.request.query_params.get("to"))


async def _usage_page(ctx: Ctx, start: str | None, end: str | None, status: int = 200, notice: str | None = None,
                      error: str | None = None) -> Response:
    account_id = need_account(ctx)
    accounts = app_state(ctx.request).accounts
    data = await usage_data(ctx, account_id, start, end)
    account = await accounts.ledger.get_account(account_id)
    credits = await accounts.usage_views.topups(account_id, limit=10)
    return render(ctx, "usage.html", status=status, title="Usage", data=data, account=account, credits=credits,
                  notice=notice, error=error)


@router.get("/usage.csv", include_in_schema=False)
async def usage_csv(ctx: Context) -> Response:
    account_id = need_account(ctx)
    data = await usage_data(ctx, account_id, ctx.request.query_params.get("from"), ctx.request.query_params.get("to"))
    return csv_response(data["records"], f"usage-{data['from']}-{data['to']}.csv")


CSV_COLUMNS = ("created_at", "request_id", "key_id", "key_name", "model", "prompt_tokens", "cached_tokens",
               "completion_tokens", "reasoning_tokens", "cost_usd", "status", "latency_ms")


def csv_response(records: list[dict[str, Any]], filename: str, columns: tuple[str, ...] = CSV_COLUMNS) -> Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in records:
        # A cell starting with = + - @ would be a formula in a spreadsheet: prefixed with ' (CSV injection).
        writer.writerow([_cell(row.get(c, "")) for c in columns])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": f'attachment; filename="{filename}"', "cache-control": "no-store"})


def _cell(value: object) -> object:
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@") else value


@router.post("/redeem", include_in_schema=False)
async def redeem(ctx: Context) -> Response:
    account_id = need_account(ctx)
    fields = await form(ctx)
    code = fields.get("code", "").strip()
    if not code:
        return await _usage_page(ctx, None, None, 400, error="Enter a top-up code.")
    try:
        done = await app_state(ctx.request).accounts.codes.redeem(code, account_id)
    except RedeemError as exc:
        return await _usage_page(ctx, None, None, 409 if exc.code == "code_already_redeemed" else 400, error=str(exc))
    return await _usage_page(ctx, None, None, notice=f"Redeemed: ${format_usd(done.amount_pusd)} was added to "
                                                     "your balance.")
