"""GET /user/balance (and /v1/user/balance): the caller's account balance in DeepSeek's shape.

    {"is_available": true, "balance_infos": [{"currency": "USD", "total_balance": "1.23",
                                               "granted_balance": "0.23", "topped_up_balance": "1.00"}]}

total_balance is the account's money not yet charged: its free balance plus what open reservations hold
for requests in flight (released back, minus their cost, when they end). granted_balance is the
promotional part of it (spent first), topped_up_balance the rest. is_available: whether the free balance
can start a request now. Amounts are exact decimal strings with at least two decimal places.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from flashserve.accounts.keys import Principal
from flashserve.accounts.pricing import format_usd
from flashserve.api.auth import require_api_key
from flashserve.api.state import app_state
from flashserve.errors import server_error

router = APIRouter()


def usd_string(pusd: int) -> str:
    """'1' -> '1.00', '0.5' -> '0.50', '0.00000868' stays exact."""
    text = format_usd(pusd)
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@router.get("/user/balance")
@router.get("/v1/user/balance")
async def user_balance(request: Request, principal: Annotated[Principal, Depends(require_api_key)]) -> dict[str, Any]:
    try:
        account = await app_state(request).accounts.ledger.get_account(principal.account_id)
    except Exception:  # noqa: BLE001 - the database is away
        raise server_error(503, "The accounts database is unavailable; retry shortly.", "ledger_unavailable",
                           retry_after_s=2) from None
    if account is None:  # the key outlived its account: nothing to spend
        account = {"balance_pusd": 0, "reserved_pusd": 0, "granted_pusd": 0}
    total = account["balance_pusd"] + account["reserved_pusd"]
    granted = account["granted_pusd"]
    return {"is_available": account["balance_pusd"] > 0, "balance_infos": [{
        "currency": "USD", "total_balance": usd_string(total), "granted_balance": usd_string(granted),
        "topped_up_balance": usd_string(total - granted)}]}
