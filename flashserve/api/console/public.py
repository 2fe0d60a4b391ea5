"""The console's public pages: the models list, a page per model, sign-in (API key, admin key, or name and
password), registration (when enabled) and sign-out; `/` redirects to `/console/`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import RedirectResponse, Response

from flashserve.api.console import session as sessions
from flashserve.api.console.model_docs import EXAMPLE_LABELS, REQUEST_FIELDS, cost_example, examples, response_example
from flashserve.api.console.web import (
    Ctx,
    admin_fingerprint,
    base_url,
    console_state,
    context,
    form,
    redirect,
    render,
)
from flashserve.api.state import app_state

router = APIRouter()
Context = Annotated[Ctx, Depends(context)]


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/console", include_in_schema=False)
@router.get("/console/", include_in_schema=False)
async def home(ctx: Context) -> Response:
    """The usage page when signed in to an account, the admin page for the admin, else the models."""
    if ctx.session.account_id is not None:
        return redirect(ctx, "/console/usage")
    if ctx.session.admin:
        return redirect(ctx, "/console/admin")
    return await models_list(ctx)


@router.get("/console/models", include_in_schema=False)
async def models_list(ctx: Context) -> Response:
    cards = app_state(ctx.request).catalog.models()
    return render(ctx, "models.html", cards=cards, title="Models")


@router.get("/console/models/{model_id:path}", include_in_schema=False)
async def model_page(model_id: str, ctx: Context) -> Response:
    catalog = app_state(ctx.request).catalog
    if model_id not in catalog.entries and catalog.alias(model_id) is None:
        return render(ctx, "error.html", status=404, title="Model not found",
                      message=f"No model with id '{model_id}' is served here.")
    card, _ = catalog.resolve(model_id)
    return render(ctx, "model.html", title=model_id, card=catalog.model_object(model_id), example=cost_example(card),
                  examples=examples(card, base_url(ctx.request)), labels=EXAMPLE_LABELS,
                  request_fields=REQUEST_FIELDS, response_example=response_example(card))


def _next(target: str | None, fallback: str) -> str:
    """Only a path under /console/ (never another site) is a place to go after signing in."""
    return target if target and target.startswith("/console/") and not target.startswith("//") else fallback


@router.get("/console/signin", include_in_schema=False)
async def signin_page(ctx: Context, next: str | None = None, admin: str | None = None) -> Response:
    return render(ctx, "signin.html", title="Sign in", next=_next(next, ""), error=None,
                  admin_needed=bool(admin))


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post("/console/signin", include_in_schema=False)
async def signin(ctx: Context) -> Response:
    fields = await form(ctx)
    state = app_state(ctx.request)
    console = console_state(ctx.request)
    client = _client(ctx.request)
    next_path = _next(fields.get("next"), "")
    wait = console.limiter.blocked(client)
    if wait:
        return render(ctx, "signin.html", status=429, title="Sign in", next=next_path, admin_needed=False,
                      error=f"Too many failed sign-ins. Try again in {int(wait) + 1} seconds.")
    ttl = console.config.session_ttl_s
    key = fields.get("api_key", "").strip()
    name, password = fields.get("name", "").strip(), fields.get("password", "")
    session = None
    if key:
        if state.accounts.is_admin(key):
            session = sessions.new_session(ttl, admin=True, admin_fp=admin_fingerprint(ctx.request), who="admin")
        else:
            principal = await state.accounts.keys.verify(key)
            if principal is not None:
                session = sessions.new_session(ttl, account_id=principal.account_id, key_id=principal.key_id,
                                               who=f"{principal.prefix}…")
    elif name and password:  # registered users keep signing in after registration is turned off
        user = await state.accounts.console_users.authenticate(name, password)
        if user is not None:
            session = sessions.new_session(ttl, account_id=user.account_id, key_id=user.key_id, who=user.name)
    if session is None:
        console.limiter.failed(client)
        return render(ctx, "signin.html", status=401, title="Sign in", next=next_path, admin_needed=False,
                      error="That key (or name and password) is not valid, or the key was revoked.")
    fallback = "/console/admin" if session.admin else "/console/usage"
    response = RedirectResponse(_next(next_path, fallback), status_code=303)
    sessions.set_cookie(response, ctx.request, session, state.server_key)
    return response


@router.post("/console/signout", include_in_schema=False)
async def signout(ctx: Context) -> Response:
    await form(ctx)
    response = RedirectResponse("/console/signin", status_code=303)
    sessions.clear_cookie(response, ctx.request)
    return response


@router.get("/console/register", include_in_schema=False)
async def register_page(ctx: Context) -> Response:
    mode = console_state(ctx.request).config.registration
    if mode == "off":
        return render(ctx, "error.html", status=404, title="Registration is closed",
                      message="This server does not take registrations; ask its operator for an API key.")
    return render(ctx, "register.html", title="Create an account", error=None, invite=mode == "invite")


@router.post("/console/register", include_in_schema=False)
async def register(ctx: Context) -> Response:
    fields = await form(ctx)
    console = console_state(ctx.request)
    config = console.config
    invite = config.registration == "invite"
    if config.registration == "off":
        return render(ctx, "error.html", status=404, title="Registration is closed", message="Registration is off.")
    client = _client(ctx.request)
    if console.limiter.blocked(client):
        return render(ctx, "register.html", status=429, title="Create an account", invite=invite,
                      error="Too many failed attempts; try again later.")
    if invite and fields.get("invite_code", "").strip() != config.invite_code:
        console.limiter.failed(client)
        return render(ctx, "register.html", status=403, title="Create an account", invite=invite,
                      error="That invite code is not valid.")
    name = fields.get("name", "").strip()
    if not 1 <= len(name) <= 200:
        return render(ctx, "register.html", status=400, title="Create an account", invite=invite,
                      error="Choose a name of 1 to 200 characters.")
    try:
        user = await app_state(ctx.request).accounts.console_users.register(name, fields.get("password", ""),
                                                                           config.granted_balance_pusd)
    except ValueError as exc:
        return render(ctx, "register.html", status=400, title="Create an account", invite=invite, error=str(exc))
    session = sessions.new_session(config.session_ttl_s, account_id=user.account_id, key_id=user.key_id,
                                   who=user.name)
    response = RedirectResponse("/console/keys", status_code=303)
    sessions.set_cookie(response, ctx.request, session, app_state(ctx.request).server_key)
    return response
