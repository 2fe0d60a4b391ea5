"""Admission and settlement of one request.

`Meter.admit` runs before any model work: a request over a limit of its key, its account or its end user
(the request's `user`) gets a 429 naming the limit, with retry-after (a shared limiter whose Redis is
down and which fails closed: 503); then the request's worst-case cost is reserved in the database
(`accounts/reservations.py`): the prompt at the cache-miss price plus its completion budget at the output
price, `max_tokens` clamped to what the account (and the key's spending caps) can pay. When not even the
prompt and one token fit: 402 `insufficient_balance` (or `spending_cap_exceeded`, naming the cap). A
ledger that cannot be reached: 503 `ledger_unavailable`.

Once the backend has accepted the request, `Meter.record` prices the engine's token counts and settles:
the actual cost charged, the rest released and the usage row written, in one transaction, exactly once,
whatever ended the request; when the database is away, through the durable outbox.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from flashserve import metrics
from flashserve.accounts.keys import Principal
from flashserve.accounts.limits import Lease, LimiterUnavailable, RateLimited, Scope, scopes_of
from flashserve.accounts.pricing import TokenPrices
from flashserve.accounts.reservations import CannotPay, Charge, Hold
from flashserve.accounts.service import Accounts
from flashserve.errors import INVALID_REQUEST, RATE_LIMIT, FlashserveError, server_error
from flashserve.generation import Usage

log = logging.getLogger(__name__)


class Meter:
    def __init__(self, accounts: Accounts, principal: Principal, model: str, prices: TokenPrices,
                 request_id: str, lease: Lease, hold: Hold, trace_id: str | None = None) -> None:
        self.accounts = accounts
        self.principal = principal
        self.model = model
        self.prices = prices
        self.request_id = request_id
        self.hold = hold
        self.trace_id = trace_id  # the HTTP request's x-request-id, written in the usage row
        self._lease = lease
        self._started = time.monotonic()
        self.cost_pusd: int | None = None

    @classmethod
    async def admit(cls, accounts: Accounts, principal: Principal, model: str, prices: TokenPrices,
                    request_id: str, *, prompt_tokens: int, max_tokens: int, n: int = 1, user: str | None = None,
                    trace_id: str | None = None) -> Meter:
        """Limits in every scope, then the reservation. `max_tokens` is the budget per choice before the
        money clamps it; the admitted budget is `meter.hold.max_tokens`."""
        scopes = scopes_of(principal.key_id, principal.limits, principal.account_id, principal.account_limits,
                           user, principal.user_limits)
        lease = await _acquire(accounts, scopes)
        try:
            hold = await accounts.reservations.reserve(
                request_id=request_id, account_id=principal.account_id, key_id=principal.key_id,
                caps=principal.caps, model=model, prices=prices, prompt_tokens=prompt_tokens,
                max_tokens=max_tokens, n=n)
        except CannotPay as exc:
            await lease.release(0)
            code = "insufficient_balance" if exc.cap is None else "spending_cap_exceeded"
            raise FlashserveError(402, str(exc), INVALID_REQUEST, None, code) from None
        except Exception as exc:  # noqa: BLE001 - the ledger is away: nothing may run unpaid
            await lease.release(0)
            log.error("ledger unreachable at admission of %s: %s", request_id, type(exc).__name__)
            raise server_error(503, "The billing ledger is unavailable; retry shortly.", "ledger_unavailable",
                               retry_after_s=2) from None
        return cls(accounts, principal, model, prices, request_id, lease, hold, trace_id)

    @staticmethod
    async def admit_free(accounts: Accounts, principal: Principal, user: str | None = None) -> None:
        """A request that costs nothing (tokenize): it takes a request slot in every scope of limits (429
        when none is left) and gives it back at once, with no tokens and no usage row."""
        scopes = scopes_of(principal.key_id, principal.limits, principal.account_id, principal.account_limits,
                           user, principal.user_limits)
        lease = await _acquire(accounts, scopes)
        await lease.release(0)

    def cost(self, usage: Usage) -> int:
        return self.prices.cost(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)

    async def release_unused(self) -> None:
        """The request never reached the model: free its limit slots and its reservation, write nothing."""
        await self._lease.release(0)
        await self.accounts.cancel(self.request_id)

    async def record(self, usage: Usage, status: str) -> int:
        """Settle (once; later calls return the first cost): the usage row and the charge, or, with the
        database away, the outbox entry that will write them."""
        if self.cost_pusd is not None:
            return self.cost_pusd
        self.cost_pusd = cost = self.cost(usage)
        try:
            await self._lease.release(usage.total_tokens)
        except Exception:  # noqa: BLE001 - a limiter's failure must never cost the usage row
            log.exception("could not release the rate-limit lease of %s", self.request_id)
        charge = Charge(
            request_id=self.request_id, account_id=self.principal.account_id, key_id=self.principal.key_id,
            model=self.model, prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens, reasoning_tokens=usage.reasoning_tokens, cost_pusd=cost,
            status=status, latency_ms=int((time.monotonic() - self._started) * 1000), x_request_id=self.trace_id,
        )
        charged = await self.accounts.settle(charge)
        if charged is not None and charged != cost:
            self.cost_pusd = cost = charged
        metrics.record_billing(self.model, self.principal.key_id, usage.prompt_tokens, usage.cached_tokens,
                               usage.completion_tokens, usage.reasoning_tokens, cost)
        return cost


async def _acquire(accounts: Accounts, scopes: Sequence[Scope]) -> Lease:
    """A lease in every scope, or the surface-neutral error: 429 with retry-after, 503 when a shared
    limiter cannot be reached and fails closed."""
    try:
        return await accounts.limiter.acquire(scopes)
    except RateLimited as exc:
        raise FlashserveError(429, str(exc), RATE_LIMIT, None, "rate_limit_exceeded",
                              headers={"retry-after": str(exc.retry_after)}) from None
    except LimiterUnavailable:
        raise server_error(503, "Rate limits cannot be checked right now; retry shortly.",
                           "limits_unavailable", retry_after_s=1) from None
