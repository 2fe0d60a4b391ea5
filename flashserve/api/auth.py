"""Bearer authentication: API keys for `/v1/*`, the admin key for `/admin/*`.

An API key may also come as `x-api-key` (Anthropic's header: its SDKs and Claude Code send it).

Neither the presented key nor any hash of it appears in an error message or a log line.
"""

from __future__ import annotations

from fastapi import Request

from flashserve.accounts.keys import Principal
from flashserve.api.state import app_state
from flashserve.errors import INVALID_REQUEST, FlashserveError, server_error


def _bearer(request: Request, where: str = "in the Authorization header as 'Bearer YOUR_KEY'") -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise FlashserveError(401, f"You didn't provide an API key. Provide it {where}.", INVALID_REQUEST, None,
                              "invalid_api_key")
    return token.strip()


async def require_api_key(request: Request) -> Principal:
    """The caller's principal; 401 for a missing, unknown, revoked or expired key."""
    token = request.headers.get("x-api-key", "").strip() or _bearer(
        request, "in the 'x-api-key' header or in the Authorization header as 'Bearer YOUR_KEY'")
    try:
        principal = await app_state(request).accounts.keys.verify(token)
    except Exception:  # noqa: BLE001 - the accounts database is away: nobody can be admitted
        raise server_error(503, "The accounts database is unavailable; retry shortly.", "ledger_unavailable",
                           retry_after_s=2) from None
    if principal is None:
        raise FlashserveError(401, "Incorrect API key provided, or the key was revoked or has expired.",
                          INVALID_REQUEST, None, "invalid_api_key")
    return principal


async def require_admin_key(request: Request) -> None:
    if not app_state(request).accounts.is_admin(_bearer(request)):
        raise FlashserveError(401, "This endpoint needs the admin key.", INVALID_REQUEST, None, "invalid_admin_key")
