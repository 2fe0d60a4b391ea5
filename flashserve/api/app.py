"""The FastAPI application: routes, error handlers, the lifespan that opens
the accounts database (migrating it) on start-up and closes every backend
(draining the engine thread) and the database on shutdown, and the graceful
drain a SIGTERM starts (`drain`).

`create_app` takes fully built parts (catalog, accounts) so tests can
assemble an app around fake backends without loading a model; its state is
one typed `api/state.py: AppState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashserve import __version__, metrics
from flashserve.accounts.service import Accounts
from flashserve.api import admin, anthropic, balance, chat, completions, console, models, responses, tokenizer, usage
from flashserve.api import metrics as metrics_route
from flashserve.api.errors import error_response, install_error_handlers
from flashserve.api.state import AppState, app_state
from flashserve.backends.base import Backend
from flashserve.catalog import Catalog
from flashserve.errors import FlashserveError
from flashserve.request_scope import CURRENT, REQUEST_ID_HEADER, RequestScope, accept_request_id
from flashserve.server_key import ServerKey

log = logging.getLogger(__name__)
access_log = logging.getLogger("flashserve.access")


_SURFACES = (("/v1/chat/completions", "chat"), ("/v1/messages", "anthropic"), ("/anthropic/v1/messages", "anthropic"),
             ("/v1/responses", "responses"), ("/v1/completions", "completions"), ("/v1/models", "models"),
             ("/admin/", "admin"), ("/v1/usage", "usage"))


def surface_of(path: str) -> str:
    """The API surface a path belongs to: a bounded label for the request counters."""
    for prefix, surface in _SURFACES:
        if path.startswith(prefix):
            return surface
    return "other"


class _RequestIds:
    """Outermost: gives each request its id (the client's `x-request-id` when well-formed, else a new one),
    echoes it on every response (errors, 413 and 503 included), opens the `request_scope.RequestScope` every
    log line of the request carries, and when the response ends counts it (`flashserve_requests_total`) and
    logs its summary line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode())
        request_scope = RequestScope(accept_request_id(given.decode("latin-1") if given else None),
                                     surface=surface_of(scope["path"]))
        status = 500
        header = (REQUEST_ID_HEADER.encode(), request_scope.request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*(h for h in message.get("headers", []) if h[0].lower() != header[0]),
                                      header]
            await send(message)

        token = CURRENT.set(request_scope)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] not in _UNCOUNTED:
                _count_and_log(request_scope, status)
            CURRENT.reset(token)


_UNCOUNTED = ("/health", "/metrics")  # probes and scrapes: answered with an id, neither counted nor logged


def _count_and_log(request_scope: RequestScope, status: int) -> None:
    elapsed = time.monotonic() - request_scope.started
    metrics.REQUESTS.labels(request_scope.model or "", request_scope.surface, str(status),
                            request_scope.code or "").inc()
    metrics.REQUEST_LATENCY.labels(request_scope.surface).observe(elapsed)
    access_log.info("request done", extra=request_scope.summary(status))


class _Admission:
    """In front of every route: once the server drains, every new request gets 503 (health checks still
    answer); a body over `max_body_bytes` gets 413 before anything parses it; and the requests in flight
    are counted (a streamed response counts until its last byte) for the drain to wait on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = app_state(scope["app"])
        if state.draining and scope["path"] != "/health":
            error = FlashserveError(503, "The server is shutting down; retry shortly.", "server_error", None,
                                "shutting_down", headers={"retry-after": "5"})
            await error_response(error, scope["path"])(scope, receive, send)
            return
        state.inflight += 1
        try:
            body = await _read_body(scope, receive, state.max_body_bytes)
            if body is None:
                error = FlashserveError(413, f"The request body is larger than {state.max_body_bytes} bytes.",
                                    "invalid_request_error", None, "request_too_large")
                await error_response(error, scope["path"])(scope, receive, send)
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            state.inflight -= 1


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it is known to exceed `limit` (a declared length is
    trusted for that, so an oversized upload is refused without reading it)."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # a disconnect: the route sees an empty body and the disconnect after
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then whatever the client sends next (its disconnect)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # type: ignore[return-value]

    return replay  # type: ignore[return-value]


async def drain(app: FastAPI, timeout_s: float) -> None:
    """The graceful part of a shutdown: admit nothing new, let requests in flight finish for up to
    `timeout_s`, then abort what is left in the engines. An aborted request still ends its response and
    records its usage (its handler does, as for a client disconnect), which this waits for."""
    state = app_state(app)
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while state.inflight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if state.inflight:
        aborted = 0
        for backend in state.catalog.backends():
            aborted += await backend.abort_all()
        log.warning("drain time (%.0fs) is up: aborted %d request(s) in the engine", timeout_s, aborted)
        settle = loop.time() + 10.0
        while state.inflight and loop.time() < settle:
            await asyncio.sleep(0.05)


def create_app(catalog: Catalog[Backend], accounts: Accounts, *, sse_keepalive_s: float = 10.0,
               max_body_bytes: int = 8 << 20, server_key: ServerKey | None = None,
               anthropic_models: dict[str, str] | None = None, responses_retention_days: float = 30.0,
               responses_purge_interval_s: float = 3600.0, console_config: console.ConsoleConfig | None = None,
               serve_metrics: bool = True) -> FastAPI:
    """The whole HTTP service around built parts: a `Catalog` (model ids -> card + backend; any object
    meeting `backends/base.py: Backend` serves, a fake one included) and `Accounts` (a SQLite file in a
    temporary directory will do). The lifespan opens the accounts database (migrating it) and, at the
    end, closes every backend and the database. For an in-process test::

        catalog: Catalog[Backend] = Catalog()
        catalog.add(make_card("m", context_length=4096, reasoning=ReasoningSpec(), weights="fake",
                              description="fake", created=0), FakeBackend())
        accounts = Accounts(f"sqlite+aiosqlite:///{tmp}/t.db",
                            Bootstrap(api_key=key, admin_key=admin, default_balance_pusd=10**12))
        app = create_app(catalog, accounts)
        async with app.router.lifespan_context(app):  # httpx's ASGITransport runs no lifespan itself
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                await c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=...)

    `sse_keepalive_s` and `max_body_bytes` are the settings of the same names. `server_key` is the
    deployment secret (`server_key.py`); without one the app makes a random key of its own, which is right
    for a test but not for gateways that must open each other's sealed data. `anthropic_models` maps the
    Anthropic surface's model names (glob patterns, e.g. "claude-*") to catalog ids; default: every
    `claude-*` -> deepseek/deepseek-v4-flash. Stored responses (`/v1/responses` with `store: true`) are kept
    `responses_retention_days`; a lifespan task purges expired ones every `responses_purge_interval_s`.
    The web console (`api/console/`) is served under /console/ with `console_config` (default: sign-in with
    API keys only).
    `serve_metrics`: whether `GET /metrics` (admin key) is a route here; False when the `metrics_bind`
    setting serves them on an address of their own.
    """
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await accounts.start()
        await accounts.recover()  # this gateway's outbox from an earlier run; SQLite: leftover reservations
        purge = asyncio.create_task(responses.purge_expired_loop(accounts, responses_purge_interval_s))
        upkeep = asyncio.create_task(accounts.maintain())  # heartbeat, outbox replay, reaper
        try:
            yield
        finally:
            # Awaited before the database closes: a task cancelled mid-query would otherwise wait forever
            # on a connection whose worker thread is gone.
            for task in (purge, upkeep):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(Exception):
                await accounts.replay_outbox()  # a last try; what is left waits for the next start
            for backend in catalog.backends():
                await backend.close()
            await accounts.close()

    # FastAPI's own OpenTelemetry hooks off: flashserve exports its own series (/metrics, metrics.py), and
    # those hooks looked up the global tracer provider (an os.environ read) on every request.
    app = FastAPI(title="flashserve", version=__version__, lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    key = server_key if server_key is not None else ServerKey(os.urandom(32), "ephemeral")
    app.state.flashserve = AppState(catalog, accounts, key, sse_keepalive_s=sse_keepalive_s,
                                    max_body_bytes=max_body_bytes, responses_retention_days=responses_retention_days,
                                    responses_purge_interval_s=responses_purge_interval_s)
    if anthropic_models is not None:
        app.state.flashserve.anthropic_models = dict(anthropic_models)
    app.add_middleware(_Admission)
    app.add_middleware(_RequestIds)  # added last: outermost, so even _Admission's 413 and 503 carry the id
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(tokenizer.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(models.router)
    app.include_router(usage.router)
    app.include_router(balance.router)
    app.include_router(admin.router)
    console.install(app, console_config or console.ConsoleConfig())
    if serve_metrics:
        app.include_router(metrics_route.router)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        state = app_state(request)
        status = "draining" if state.draining else "ok"
        return {"status": status, "models": [c.id for c in state.catalog.cards()]}

    return app
