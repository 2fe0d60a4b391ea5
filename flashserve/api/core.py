"""The shared core every API surface calls: model -> admission -> backend -> deltas -> usage, once.

A surface adapter (`api/chat.py` for OpenAI chat completions; Anthropic Messages, Responses and legacy
completions next) parses its wire format into a `generation.py: GenerationRequest`, then:

    call = await open_call(request, principal, gen, id_prefix="chatcmpl", check=my_card_checks)
    # streaming: the events, each rendered in the surface's own format
    async with call.streaming() as events:
        async for event in events:  # ChoiceDelta | KeepAlive | Failed | Finished
            ...
    # or not streaming: every delta handed over, the client's disconnect watched
    cost = await call.collect(on_delta, request)  # None: the client left

What happens here and nowhere else: the model is resolved (404; an alias gives its target, and its
default thinking switch when the request sets neither `thinking` nor an effort), the prompt is counted,
limits are checked (429 per key, account and end user; 503 when a shared limiter fails closed) and the
request's worst-case cost is reserved (402, 503: `api/billing.py: Meter`), `max_tokens` is clamped to what
the account can pay (said in the `x-flashserve-max-tokens-clamped` header: `call.headers`), the backend
is opened under the request's id and tenant (the account, narrowed by a router's cache salt and by the
request's `user`: end users of one account do not share cached prefixes), a stream waiting on the engine
yields `KeepAlive` every `sse_keepalive_s`, a client disconnect aborts the generation, and whatever ends
the request (completion, error, disconnect, the drain's abort) the generation is aborted and the request
settled exactly once (actual cost charged, the rest of the reservation released, the usage row written),
shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from flashserve import request_scope
from flashserve.accounts.keys import Principal
from flashserve.accounts.pricing import format_usd
from flashserve.api.billing import Meter
from flashserve.api.state import app_state
from flashserve.backends.base import Backend
from flashserve.catalog import ModelCard
from flashserve.errors import SERVER_ERROR, FlashserveError
from flashserve.generation import CACHE_SALT_HEADER, ChoiceDelta, Generation, GenerationRequest, RequestContext, Usage
from flashserve.ids import request_id

log = logging.getLogger(__name__)
T = TypeVar("T")
COST_HEADER = "x-flashserve-cost-usd"  # what a non-streaming answer cost, in USD
# The completion budget the account's free balance (or the key's spending cap) could pay for, when it is
# below the max_tokens asked: the answer ends with finish_reason "length" there.
CLAMPED_HEADER = "x-flashserve-max-tokens-clamped"


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Nothing came for `sse_keepalive_s`: a streaming surface sends its keep-alive (an SSE comment)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The generation failed after the response began: the surface reports it in-band, then ends."""

    error: FlashserveError


@dataclass(frozen=True, slots=True)
class Finished:
    """The generation ended normally; its usage is recorded and cost `cost_pusd`."""

    usage: Usage
    cost_pusd: int


Event = ChoiceDelta | KeepAlive | Failed | Finished


async def open_call(request: Request, principal: Principal, gen: GenerationRequest, *, id_prefix: str = "chatcmpl",
                    check: Callable[[ModelCard], None] | None = None) -> Call:
    """Resolve the model, run the surface's checks against its card, admit the request (balance, limits)
    and open the backend. Nothing is charged when this raises."""
    state = app_state(request)
    card, backend = resolve_model(request, gen)
    if check is not None:
        check(card)
    # The model's output cap clamps max_tokens (and fills it in when absent), never refuses it.
    gen.sampling.max_tokens = card.clamp_max_tokens(gen.sampling.max_tokens)
    tenant = cache_tenant(request, principal, gen.user)
    scope = request_scope.current()
    trace_id = scope.request_id if scope is not None else request_scope.new_request_id()
    if scope is not None:
        scope.account, scope.key_id, scope.model = principal.account_id, principal.key_id, card.id
    ctx = RequestContext(request_id=request_id(id_prefix), tenant=tenant, trace_id=trace_id,
                         cache_salt=state.server_key.keyed_hash("cache-salt", tenant.encode())[:32])
    # The reservation needs the prompt's size: exact for the local engine, an estimate for a remote one.
    prompt_tokens = await backend.count_tokens(gen)
    room = max(card.context_length - prompt_tokens, 1)
    budget = min(gen.sampling.max_tokens or room, room)
    meter = await Meter.admit(state.accounts, principal, card.id, card.token_prices, ctx.request_id,
                              prompt_tokens=prompt_tokens, max_tokens=budget, n=gen.sampling.n, user=gen.user,
                              trace_id=trace_id)
    if meter.hold.clamped:
        gen.sampling.max_tokens = meter.hold.max_tokens
    try:
        generation = await backend.open(gen, ctx)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await meter.release_unused()
        raise
    return Call(ctx.request_id, int(time.time()), card, backend, generation, meter, state.sse_keepalive_s)


def resolve_model(request: Request, gen: GenerationRequest) -> tuple[ModelCard, Backend]:
    """The card and backend of the request's model (404 when not served). An alias resolves to its target
    and lends the request its default thinking switch when the request sets neither `thinking` nor an
    effort (deepseek-chat: off; deepseek-reasoner: on)."""
    catalog = app_state(request).catalog
    card, backend = catalog.resolve(gen.model)
    alias = catalog.alias(gen.model)
    if alias is not None and alias.thinking is not None and gen.reasoning.thinking is None \
            and gen.reasoning.effort is None:
        gen.reasoning = replace(gen.reasoning, thinking=alias.thinking)
    return card, backend


def cache_tenant(request: Request, principal: Principal, user: str | None) -> str:
    """The prefix cache's namespace: the account, narrowed by a router's salt (a router in front passes its
    tenant along; it can only narrow this account's namespace, never reach another's) and by the end user
    (`user`, hashed: as DeepSeek's user id, it keeps one end user's cached prefixes from another's)."""
    salt = request.headers.get(CACHE_SALT_HEADER, "")[:200]
    tenant = principal.account_id + (f"/{salt}" if salt else "")
    if user:
        tenant += "/user:" + hashlib.blake2b(user.encode(), digest_size=12).hexdigest()
    return tenant


async def admit_free(request: Request, principal: Principal) -> None:
    """Admission of a free request (tokenize, detokenize): it counts against the key's requests per minute
    (429 past them) and charges nothing, writes no usage row."""
    await Meter.admit_free(app_state(request).accounts, principal)


class Call:
    """One admitted request whose backend is generating; ends with `finish` (always, exactly once)."""

    def __init__(self, id: str, created: int, card: ModelCard, backend: Backend, generation: Generation,
                 meter: Meter, keepalive_s: float) -> None:
        self.id = id
        self.created = created
        self.card = card
        self.backend = backend
        self.generation = generation
        self.meter = meter
        self.keepalive_s = keepalive_s
        self.status = "cancelled"  # unless the request ends below, the client went away

    @property
    def headers(self) -> dict[str, str]:
        """The response headers every surface sends: the request id, and the clamped budget when the money
        clamped max_tokens."""
        out = {"x-request-id": self.id}
        if self.meter.hold.clamped:
            out[CLAMPED_HEADER] = str(self.meter.hold.max_tokens)
        return out

    @property
    def system_fingerprint(self) -> str:
        return self.backend.system_fingerprint

    @property
    def usage(self) -> Usage:
        return self.generation.usage

    async def finish(self, status: str | None = None) -> int:
        """Abort whatever still runs and write the usage row (once: later calls return the first cost),
        shielded from a disconnect's cancellation so neither is lost."""
        with anyio.CancelScope(shield=True):
            await self.generation.abort()
            usage = self.generation.usage
            cost = await self.meter.record(usage, status or self.status)
            scope = request_scope.current()
            if scope is not None:
                scope.prompt_tokens, scope.cached_tokens = usage.prompt_tokens, usage.cached_tokens
                scope.completion_tokens, scope.cost_usd = usage.completion_tokens, format_usd(cost)
            return cost

    # -- streaming ---------------------------------------------------------------------------------------
    @asynccontextmanager
    async def streaming(self) -> AsyncIterator[AsyncIterator[Event]]:
        """The request's events, for a surface that streams. Leaving the block (the end, an error, the
        client's disconnect cancelling the response) finishes the call."""
        try:
            yield self._events()
        finally:
            await self.finish()

    async def _events(self) -> AsyncIterator[Event]:
        try:
            async for delta in paced(self.generation, self.keepalive_s):
                yield KeepAlive() if delta is None else delta
        except Exception as exc:  # noqa: BLE001 - the response has begun: reported in-band
            self.status = "error"
            error = self._domain_error(exc)
            scope = request_scope.current()
            if scope is not None:
                scope.code = error.code or error.type
            yield Failed(error)
            return
        self.status = "ok"
        cost = await self.finish()
        yield Finished(self.generation.usage, cost)

    def _domain_error(self, exc: Exception) -> FlashserveError:
        if isinstance(exc, FlashserveError):
            return exc
        log.exception("stream %s failed", self.id)
        return FlashserveError(500, "The server had an error while generating.", SERVER_ERROR)

    # -- not streaming -------------------------------------------------------------------------------------
    async def collect(self, on_delta: Callable[[ChoiceDelta], None], request: Request) -> int | None:
        """Run the generation to its end, handing every delta to `on_delta`, while watching for the client's
        disconnect. Returns the cost, or None when the client left (the generation is aborted). An error
        from the backend is raised (after the usage so far is recorded) for the surface's error handler."""

        async def consume() -> None:
            async for delta in self.generation:
                on_delta(delta)

        collector = asyncio.create_task(consume())
        watcher = asyncio.create_task(wait_for_disconnect(request))
        self.status = "error"
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not collector.done():
                log.info("client disconnected; aborting %s", self.id)
                self.status = "cancelled"
                collector.cancel()
                await self.generation.abort()
                return None
            collector.result()
            self.status = "ok"
        finally:
            watcher.cancel()
            if not collector.done():
                collector.cancel()
            cost = await self.finish()
        return cost


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the only message left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def paced(source: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """The source's items, with None each time `interval` seconds pass without one (a request waiting in
    the engine's queue, or a slow step), so a stream can send a keep-alive meanwhile."""
    it = source.__aiter__()
    pending: asyncio.Future[T] = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(it.__anext__())
    finally:
        if not pending.done():
            pending.cancel()



class SurfaceView(Protocol):
    """A surface's response under construction: its event stream, or its whole body once collected."""

    def events(self) -> AsyncIterator[str]: ...

    async def collect(self, request: Request) -> tuple[dict[str, Any], int] | None:
        """The body and its cost in pUSD; None when the client left."""
        ...


async def respond(view: SurfaceView, stream: bool, request: Request,
                  headers: dict[str, str]) -> JSONResponse | StreamingResponse:
    """The HTTP response of a surface's view: its events as SSE, or its collected body with the cost header."""
    if stream:
        return StreamingResponse(view.events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", **headers})
    out = await view.collect(request)
    if out is None:
        return JSONResponse({}, status_code=499)  # the client left; nobody reads this
    body, cost = out
    return JSONResponse(body, headers={**headers, COST_HEADER: format_usd(cost)})
