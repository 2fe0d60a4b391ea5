"""The web console, served by the API's own FastAPI app under /console/ (and `/` redirects there).

Server-rendered Jinja2 pages with a little JavaScript (streaming, charts, copy buttons), and vendored
front-end libraries in `static/vendor/` (see its README: names, versions, licences); nothing is fetched
from a CDN, so the console works offline. Modules:

- `web.py`: the session of a request, rendering, forms + CSRF, security headers;
- `session.py`: the signed session cookie, CSRF tokens, the sign-in rate limit;
- `public.py`: models list, model pages, sign-in / registration / sign-out;
- `account.py`: keys, usage (charts, table, CSV), balance and top-up codes of the signed-in account;
- `playground.py`: the playground, whose chat endpoint runs `api/chat.py` (and so `api/core.py`) on the
  session's key;
- `admin_pages.py`: accounts, keys, usage, top-up codes and engine state for the admin;
- `model_docs.py`: a model page's cost example, schema and client examples.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from flashserve.api.console import account, admin_pages, playground, public
from flashserve.api.console.config import ConsoleConfig
from flashserve.api.console.session import SignInLimiter
from flashserve.api.console.web import STATIC_DIR, ConsoleState, SecurityHeaders, SignInFirst, sign_in_redirect

__all__ = ["ConsoleConfig", "install"]


def install(app: FastAPI, config: ConsoleConfig) -> None:
    """Mount the console on `app`: its routes, static files, security headers and sign-in redirect."""
    app.state.console = ConsoleState(config, SignInLimiter(config.signin_failures, config.signin_window_s))
    app.add_middleware(SecurityHeaders)
    for module in (public, account, playground, admin_pages):
        app.include_router(module.router)
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")

    @app.exception_handler(SignInFirst)
    async def _sign_in_first(request: Request, exc: SignInFirst) -> Response:
        return sign_in_redirect(exc)
