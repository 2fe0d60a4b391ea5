"""What every console page shares: the session of the request (`Ctx`), rendering a template, form parsing
with the CSRF check, the "sign in first" redirect, and the security headers on every console response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import jinja2
from fastapi import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashserve import __version__
from flashserve.accounts.keys import KeyLimits, Principal
from flashserve.api.console import session as sessions
from flashserve.api.console.config import ConsoleConfig
from flashserve.api.console.session import Session, SignInLimiter
from flashserve.api.state import app_state
from flashserve.errors import INVALID_REQUEST, FlashserveError

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                          trim_blocks=True, lstrip_blocks=True)

# No inline script anywhere (JSON data rides in <script type="application/json">, which never runs), no
# framing, no plugins, forms and fetches only to this origin.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin")]


class SecurityHeaders:
    """Adds the console's security headers to every response under /console/ and to `/`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/" or path.startswith("/console")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


@dataclass(slots=True)
class ConsoleState:
    config: ConsoleConfig
    limiter: SignInLimiter


def console_state(request: Request) -> ConsoleState:
    state: ConsoleState = request.app.state.console
    return state


@dataclass(slots=True)
class Ctx:
    """The request's session (a fresh anonymous one when it had none), and whether to send its cookie."""

    request: Request
    session: Session
    send_cookie: bool

    @property
    def csrf(self) -> str:
        return sessions.csrf_token(self.session, app_state(self.request).server_key)

    async def principal(self) -> Principal | None:
        """The key the playground bills, if it is still live (a revoked key ends what it signed in)."""
        if self.session.key_id is None:
            return None
        key = await app_state(self.request).accounts.keys.get(self.session.key_id)
        if key is None or key["revoked_at"] is not None or key["account_id"] != self.session.account_id:
            return None
        return Principal(key["id"], key["account_id"], key["prefix"],
                         KeyLimits(key["max_concurrent"], key["rpm"], key["tpm"]))


def admin_fingerprint(request: Request) -> str:
    """A keyed fingerprint of the current admin key: an admin session carries it, and a new admin key makes
    every earlier admin session void. Empty when the server has no admin key."""
    state = app_state(request)
    admin_key = state.accounts.bootstrap.admin_key
    if not admin_key:
        return ""
    return state.server_key.keyed_hash(sessions.PURPOSE, b"admin|" + admin_key.encode())[:32]


async def context(request: Request) -> Ctx:
    """Dependency: the console session of this request. An account session whose key was revoked is over,
    and so is an admin session from before the admin key changed."""
    key = app_state(request).server_key
    ttl = console_state(request).config.session_ttl_s
    session = sessions.decode(request.cookies.get(sessions.COOKIE), key)
    if session is None:
        return Ctx(request, sessions.new_session(ttl), True)
    ctx = Ctx(request, session, False)
    if session.admin and (not session.admin_fp or session.admin_fp != admin_fingerprint(request)):
        return Ctx(request, sessions.new_session(ttl), True)
    if session.account_id is not None and await ctx.principal() is None:
        return Ctx(request, sessions.new_session(ttl), True)
    return ctx


class SignInFirst(Exception):
    """Raised by a page that needs a session kind the visitor lacks; answered with a redirect to sign in."""

    def __init__(self, path: str, admin: bool = False) -> None:
        self.path = path
        self.admin = admin


def need_account(ctx: Ctx) -> str:
    if ctx.session.account_id is None:
        raise SignInFirst(ctx.request.url.path)
    return ctx.session.account_id


def need_admin(ctx: Ctx) -> None:
    if not ctx.session.admin:
        raise SignInFirst(ctx.request.url.path, admin=True)


def sign_in_redirect(exc: SignInFirst) -> RedirectResponse:
    target = f"/console/signin?next={quote(exc.path)}" + ("&admin=1" if exc.admin else "")
    return RedirectResponse(target, status_code=303)


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def render(ctx: Ctx, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    page = _env.get_template(template).render(
        session=ctx.session, csrf=ctx.csrf, path=ctx.request.url.path, version=__version__,
        base_url=base_url(ctx.request), registration=console_state(ctx.request).config.registration, **values)
    response = HTMLResponse(page, status_code=status, headers={"cache-control": "no-store"})
    if ctx.send_cookie:
        sessions.set_cookie(response, ctx.request, ctx.session, app_state(ctx.request).server_key)
    return response


def redirect(ctx: Ctx, to: str) -> Response:
    response = RedirectResponse(to, status_code=303)
    if ctx.send_cookie:
        sessions.set_cookie(response, ctx.request, ctx.session, app_state(ctx.request).server_key)
    return response


def csrf_refused() -> FlashserveError:
    return FlashserveError(403, "The form's CSRF token is missing or wrong: reload the page and try again.",
                           INVALID_REQUEST, "csrf", "csrf_failed")


async def form(ctx: Ctx) -> dict[str, str]:
    """The posted form's fields (urlencoded), after its CSRF token checked out; 403 otherwise."""
    raw = (await ctx.request.body()).decode("utf-8", errors="replace")
    fields = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
    if not sessions.csrf_ok(ctx.session, app_state(ctx.request).server_key, fields.get("csrf")):
        raise csrf_refused()
    return fields


def check_csrf_header(ctx: Ctx) -> None:
    if not sessions.csrf_ok(ctx.session, app_state(ctx.request).server_key, ctx.request.headers.get("x-csrf-token")):
        raise csrf_refused()


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


_env.filters["pretty"] = to_json
