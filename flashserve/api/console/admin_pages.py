"""The admin's pages (a session signed in with the admin key): accounts (create, top up, balance, audit
trail), every key, usage across accounts, top-up code batches, and the engine state (the same report as
`GET /admin/engine`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.responses import Response

from flashserve.accounts.pricing import format_usd, pusd_from_usd
from flashserve.api import admin as admin_api
from flashserve.api.console.account import CSV_COLUMNS, csv_response, month_start, usage_data
from flashserve.api.console.web import Ctx, context, form, need_admin, render
from flashserve.api.state import app_state

router = APIRouter(prefix="/console/admin")
Context = Annotated[Ctx, Depends(context)]


def _money(raw: str) -> int:
    """A positive USD amount from a form, in picodollars; ValueError otherwise."""
    try:
        value = pusd_from_usd(raw.strip())
    except (ArithmeticError, ValueError):
        raise ValueError(f"'{raw}' is not a decimal USD amount.") from None
    if value <= 0:
        raise ValueError("The amount must be positive.")
    return value


async def _accounts_page(ctx: Ctx, status: int = 200, error: str | None = None,
                         notice: str | None = None) -> Response:
    ledger = app_state(ctx.request).accounts.ledger
    accounts = await ledger.list_accounts()
    return render(ctx, "admin.html", status=status, title="Admin: accounts", accounts=accounts, error=error,
                  notice=notice)


@router.get("", include_in_schema=False)
@router.get("/", include_in_schema=False)
async def admin_home(ctx: Context) -> Response:
    need_admin(ctx)
    return await _accounts_page(ctx)


@router.post("/accounts", include_in_schema=False)
async def create_account(ctx: Context) -> Response:
    need_admin(ctx)
    fields = await form(ctx)
    ledger = app_state(ctx.request).accounts.ledger
    name = fields.get("name", "").strip()
    if not 1 <= len(name) <= 200:
        return await _accounts_page(ctx, 400, error="An account needs a name of 1 to 200 characters.")
    if await ledger.account_by_name(name) is not None:
        return await _accounts_page(ctx, 400, error=f"An account named '{name}' already exists.")
    try:
        balance = _money(fields["balance_usd"]) if fields.get("balance_usd", "").strip() not in ("", "0") else 0
    except ValueError as exc:
        return await _accounts_page(ctx, 400, error=str(exc))
    account = await ledger.create_account(name, balance)
    return await _accounts_page(ctx, 201, notice=f"Created account {account['name']} ({account['id']}).")


@router.post("/accounts/{account_id}/top-up", include_in_schema=False)
async def top_up(account_id: str, ctx: Context) -> Response:
    need_admin(ctx)
    fields = await form(ctx)
    try:
        amount = _money(fields.get("amount_usd", ""))
    except ValueError as exc:
        return await _account_page(ctx, account_id, 400, error=str(exc))
    note = fields.get("note", "").strip()[:200] or "admin top-up (console)"
    if await app_state(ctx.request).accounts.ledger.top_up(account_id, amount, note) is None:
        return await _account_page(ctx, account_id)
    return await _account_page(ctx, account_id, notice=f"Added ${format_usd(amount)}.")


async def _account_page(ctx: Ctx, account_id: str, status: int = 200, error: str | None = None,
                        notice: str | None = None) -> Response:
    accounts = app_state(ctx.request).accounts
    account = await accounts.ledger.get_account(account_id)
    if account is None:
        return render(ctx, "error.html", status=404, title="No such account", message=f"No account '{account_id}'.")
    audit = await accounts.ledger.audit(account_id)
    # The ledger's identity with reservations: balance + reserved + charges = credits (`audit["ok"]`).
    audit_view = {k.replace("_pusd", "_usd"): format_usd(v) for k, v in audit.items() if k.endswith("_pusd")}
    return render(ctx, "admin_account.html", status=status, title=f"Admin: {account['name']}", account=account,
                  audit=audit_view, consistent=bool(audit["ok"]),
                  credits=await accounts.usage_views.topups(account_id),
                  keys=await accounts.keys.list(account_id),
                  records=await accounts.usage_views.records(account_id, limit=50), error=error, notice=notice)


@router.get("/accounts/{account_id}", include_in_schema=False)
async def account_page(account_id: str, ctx: Context) -> Response:
    need_admin(ctx)
    return await _account_page(ctx, account_id)


@router.get("/keys", include_in_schema=False)
async def all_keys(ctx: Context) -> Response:
    need_admin(ctx)
    accounts = app_state(ctx.request).accounts
    names = {a["id"]: a["name"] for a in await accounts.ledger.list_accounts()}
    return render(ctx, "admin_keys.html", title="Admin: keys", keys=await accounts.keys.list(), names=names,
                  activity=await accounts.usage_views.key_activity(None, month_start()))


@router.get("/usage", include_in_schema=False)
async def all_usage(ctx: Context) -> Response:
    need_admin(ctx)
    params = ctx.request.query_params
    data = await usage_data(ctx, None, params.get("from"), params.get("to"))
    names = {a["id"]: a["name"] for a in await app_state(ctx.request).accounts.ledger.list_accounts()}
    return render(ctx, "admin_usage.html", title="Admin: usage", data=data, names=names)


@router.get("/usage.csv", include_in_schema=False)
async def all_usage_csv(ctx: Context) -> Response:
    need_admin(ctx)
    params = ctx.request.query_params
    data = await usage_data(ctx, None, params.get("from"), params.get("to"))
    return csv_response(data["records"], f"usage-all-{data['from']}-{data['to']}.csv",
                        ("account_id", *CSV_COLUMNS))


async def _codes_page(ctx: Ctx, status: int = 200, new_codes: dict[str, Any] | None = None,
                      error: str | None = None) -> Response:
    codes = app_state(ctx.request).accounts.codes
    return render(ctx, "admin_codes.html", status=status, title="Admin: top-up codes", batches=await codes.batches(),
                  new_codes=new_codes, error=error)


@router.get("/codes", include_in_schema=False)
async def codes_page(ctx: Context) -> Response:
    need_admin(ctx)
    return await _codes_page(ctx)


@router.post("/codes", include_in_schema=False)
async def create_codes(ctx: Context) -> Response:
    need_admin(ctx)
    fields = await form(ctx)
    try:
        amount = _money(fields.get("amount_usd", ""))
        count = int(fields.get("count", "1") or "1")
        batch, codes = await app_state(ctx.request).accounts.codes.create_batch(
            count, amount, fields.get("note", "").strip()[:200])
    except ValueError as exc:
        return await _codes_page(ctx, 400, error=str(exc))
    return await _codes_page(ctx, 201, new_codes={"batch_id": batch, "amount_usd": format_usd(amount), "codes": codes})


@router.get("/codes/{batch_id}", include_in_schema=False)
async def batch_page(batch_id: str, ctx: Context) -> Response:
    need_admin(ctx)
    codes = await app_state(ctx.request).accounts.codes.codes(batch_id)
    return render(ctx, "admin_batch.html", title=f"Admin: {batch_id}", batch_id=batch_id, codes=codes)


@router.get("/engine", include_in_schema=False)
async def engine_page(ctx: Context) -> Response:
    need_admin(ctx)
    report = await admin_api.engine(ctx.request)  # the very function behind GET /admin/engine
    return render(ctx, "admin_engine.html", title="Admin: engine", report=report)
