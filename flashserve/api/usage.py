"""GET /v1/usage: the caller's own usage, grouped by key, model or day."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from flashserve.accounts.clock import parse_instant
from flashserve.accounts.keys import Principal
from flashserve.accounts.ledger import GROUPINGS
from flashserve.api.auth import require_api_key
from flashserve.api.state import app_state
from flashserve.errors import invalid_request

router = APIRouter()


def parse_bounds(start: str | None, end: str | None) -> tuple[datetime | None, datetime | None]:
    out: list[datetime | None] = []
    for name, value in (("from", start), ("to", end)):
        if value is None:
            out.append(None)
            continue
        try:
            out.append(parse_instant(value))
        except ValueError:
            raise invalid_request(f"Invalid '{name}': expected unix seconds or an ISO 8601 date/datetime.", name,
                                  "invalid_value") from None
    if out[0] is not None and out[1] is not None and out[0] > out[1]:
        raise invalid_request("'from' must not be after 'to'.", "from", "invalid_value")
    return out[0], out[1]


def check_group_by(group_by: str) -> str:
    if group_by not in GROUPINGS:
        raise invalid_request(f"Invalid 'group_by': expected one of {', '.join(GROUPINGS)}.", "group_by",
                              "invalid_value")
    return group_by


async def usage_report(request: Request, account_id: str | None, start: str | None, end: str | None,
                       group_by: str) -> dict[str, Any]:
    begin, finish = parse_bounds(start, end)
    data = await app_state(request).accounts.ledger.report(account_id, begin, finish, check_group_by(group_by))
    return {"object": "list", "group_by": group_by, "data": data}


@router.get("/v1/usage")
async def my_usage(
    request: Request,
    principal: Annotated[Principal, Depends(require_api_key)],
    start: Annotated[str | None, Query(alias="from")] = None,
    end: Annotated[str | None, Query(alias="to")] = None,
    group_by: str = "day",
) -> dict[str, Any]:
    return await usage_report(request, principal.account_id, start, end, group_by)
