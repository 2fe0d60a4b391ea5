"""The admin HTTP API under /admin/: accounts, balances (top-ups and grants), keys (limits and spending
caps), usage and the ledger audit for everyone. Every route needs the admin key; an ordinary API key is
refused."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from flashserve.accounts.clock import parse_instant
from flashserve.accounts.keys import KeyLimits
from flashserve.accounts.pricing import pusd_from_usd
from flashserve.accounts.reservations import SpendCaps
from flashserve.api.auth import require_admin_key
from flashserve.api.state import app_state
from flashserve.api.usage import usage_report
from flashserve.errors import FlashserveError, invalid_request, not_found

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)])

Money = str | int | float


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateAccount(_Body):
    name: str = Field(min_length=1, max_length=200)
    balance_usd: Money = "0"


class TopUp(_Body):
    amount_usd: Money
    note: str = Field(default="", max_length=200)


class Caps(_Body):
    """Spending caps in USD (null: no cap): charges plus open reservations per UTC day / calendar month."""

    daily_cap_usd: Money | None = None
    monthly_cap_usd: Money | None = None

    def caps(self) -> SpendCaps:
        return SpendCaps(*(None if v is None else _cap(v, name) for name, v in
                           (("daily_cap_usd", self.daily_cap_usd), ("monthly_cap_usd", self.monthly_cap_usd))))


class CreateKey(Caps):
    account_id: str
    name: str = Field(default="key", min_length=1, max_length=200)
    expires_at: str | None = None
    max_concurrent: int | None = Field(default=None, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


Limit = int | None


class AccountLimits(_Body):
    """The fields sent are changed (null: unlimited); the others stay as they are."""

    max_concurrent: Limit = Field(default=None, ge=1)
    rpm: Limit = Field(default=None, ge=1)
    tpm: Limit = Field(default=None, ge=1)
    user_max_concurrent: Limit = Field(default=None, ge=1)
    user_rpm: Limit = Field(default=None, ge=1)
    user_tpm: Limit = Field(default=None, ge=1)


class KeyLimitsBody(_Body):
    """The fields sent are changed (null: unlimited); the others stay as they are."""

    max_concurrent: Limit = Field(default=None, ge=1)
    rpm: Limit = Field(default=None, ge=1)
    tpm: Limit = Field(default=None, ge=1)


def _pusd(value: Money, param: str) -> int:
    try:
        return pusd_from_usd(value)
    except (ArithmeticError, ValueError):
        raise invalid_request(f"Invalid '{param}': expected a decimal USD amount.", param, "invalid_value") from None


def _cap(value: Money, param: str) -> int:
    amount = _pusd(value, param)
    if not 0 <= amount < 2**63:  # a BIGINT column of picodollars: up to ~$9.2 million
        raise invalid_request(f"'{param}' must be between 0 and 9223372 USD.", param, "invalid_value")
    return amount


def _not_found(what: str, ident: str) -> FlashserveError:
    return not_found(f"No {what} with id '{ident}'.", f"{what}_not_found")


@router.post("/accounts", status_code=201)
async def create_account(body: CreateAccount, request: Request) -> JSONResponse:
    ledger = app_state(request).accounts.ledger
    if await ledger.account_by_name(body.name) is not None:
        raise invalid_request(f"An account named '{body.name}' already exists.", "name", "account_exists")
    balance = _pusd(body.balance_usd, "balance_usd")
    if balance < 0:
        raise invalid_request("'balance_usd' must not be negative.", "balance_usd", "invalid_value")
    return JSONResponse(await ledger.create_account(body.name, balance), status_code=201)


@router.get("/accounts")
async def list_accounts(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": await app_state(request).accounts.ledger.list_accounts()}


@router.get("/accounts/{account_id}")
async def get_account(account_id: str, request: Request) -> dict[str, Any]:
    account = await app_state(request).accounts.ledger.get_account(account_id)
    if account is None:
        raise _not_found("account", account_id)
    return account


@router.post("/accounts/{account_id}/top-up")
async def top_up(account_id: str, body: TopUp, request: Request) -> dict[str, Any]:
    amount = _pusd(body.amount_usd, "amount_usd")
    if amount <= 0:
        raise invalid_request("'amount_usd' must be positive.", "amount_usd", "invalid_value")
    account = await app_state(request).accounts.ledger.top_up(account_id, amount, body.note)
    if account is None:
        raise _not_found("account", account_id)
    return account


@router.post("/accounts/{account_id}/limits")
async def set_account_limits(account_id: str, body: AccountLimits, request: Request) -> dict[str, Any]:
    """The account's limits over all its keys, and each end user's (`user_*`, by the requests' `user`)."""
    changes = body.model_dump(include=body.model_fields_set)
    account = await app_state(request).accounts.ledger.set_limits(account_id, changes)
    if account is None:
        raise _not_found("account", account_id)
    return account


@router.post("/accounts/{account_id}/grant")
async def grant(account_id: str, body: TopUp, request: Request) -> dict[str, Any]:
    """Promotional credit: kept apart from topped-up money in the ledger, and spent first."""
    amount = _pusd(body.amount_usd, "amount_usd")
    if amount <= 0:
        raise invalid_request("'amount_usd' must be positive.", "amount_usd", "invalid_value")
    account = await app_state(request).accounts.ledger.grant(account_id, amount, body.note)
    if account is None:
        raise _not_found("account", account_id)
    return account


@router.post("/keys/{key_id}/limits")
async def set_key_limits(key_id: str, body: KeyLimitsBody, request: Request) -> dict[str, Any]:
    view = await app_state(request).accounts.keys.set_limits(key_id, body.model_dump(include=body.model_fields_set))
    if view is None:
        raise _not_found("key", key_id)
    return view


@router.post("/keys", status_code=201)
async def create_key(body: CreateKey, request: Request) -> JSONResponse:
    accounts = app_state(request).accounts
    if await accounts.ledger.get_account(body.account_id) is None:
        raise _not_found("account", body.account_id)
    expires: datetime | None = None
    if body.expires_at is not None:
        try:
            expires = parse_instant(body.expires_at)
        except ValueError:
            raise invalid_request("Invalid 'expires_at': expected an ISO 8601 datetime.", "expires_at",
                                  "invalid_value") from None
    limits = KeyLimits(body.max_concurrent, body.rpm, body.tpm)
    key, view = await accounts.keys.create(body.account_id, body.name, expires, limits, caps=body.caps())
    return JSONResponse({**view, "key": key}, status_code=201)


@router.get("/keys")
async def list_keys(request: Request, account_id: str | None = None) -> dict[str, Any]:
    return {"object": "list", "data": await app_state(request).accounts.keys.list(account_id)}


@router.post("/keys/{key_id}/caps")
async def set_key_caps(key_id: str, body: Caps, request: Request) -> dict[str, Any]:
    """Replace the key's spending caps (both fields; a null or absent one removes that cap)."""
    view = await app_state(request).accounts.keys.set_caps(key_id, body.caps())
    if view is None:
        raise _not_found("key", key_id)
    return view


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
    view = await app_state(request).accounts.keys.revoke(key_id)
    if view is None:
        raise _not_found("key", key_id)
    return view


@router.get("/usage")
async def usage(
    request: Request,
    account_id: str | None = None,
    start: Annotated[str | None, Query(alias="from")] = None,
    end: Annotated[str | None, Query(alias="to")] = None,
    group_by: str = "day",
) -> dict[str, Any]:
    return await usage_report(request, account_id, start, end, group_by)


@router.get("/usage/records")
async def usage_records(request: Request, account_id: str | None = None,
                        limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict[str, Any]:
    return {"object": "list", "data": await app_state(request).accounts.ledger.records(account_id, limit)}


@router.get("/audit")
async def audit_all(request: Request) -> dict[str, Any]:
    """Every account's ledger identities (balance >= 0; balance + reserved + Σ charges = Σ credits; reserved =
    Σ open reservations); `ok` when all hold everywhere."""
    rows = await app_state(request).accounts.ledger.audit_all()
    return {"object": "ledger.audit", "ok": all(r["ok"] for r in rows), "accounts": rows}


@router.get("/accounts/{account_id}/audit")
async def audit(account_id: str, request: Request) -> dict[str, Any]:
    """One account's ledger identities (see /admin/audit), with the older names topups_pusd and spent_pusd."""
    if await app_state(request).accounts.ledger.get_account(account_id) is None:
        raise _not_found("account", account_id)
    return await app_state(request).accounts.ledger.audit(account_id)


@router.get("/engine")
async def engine(request: Request) -> dict[str, Any]:
    """Each local model's engine: block pool counts, whether its invariants hold, leaked blocks (used but
    held by no live request), running and waiting requests. For soak tests and operators."""
    out: dict[str, Any] = {}
    catalog = app_state(request).catalog
    for card in catalog.cards():
        _, backend = catalog.resolve(card.id)
        out[card.id] = await backend.inspect()
    return {"object": "engine.report", "models": out}
