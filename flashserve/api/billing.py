"""Admission and the usage record of one chat request.

`Meter.admit` runs before any model work: an account at or below zero gets a
402; a request over a limit of its key, its account or its end user (the
request's `user`) a 429 naming the limit, with retry-after; a shared limiter
whose Redis is down and which fails closed a 503. Once the backend has
accepted the request, `Meter.record` prices the engine's token counts and writes the usage row with
the balance debit in one transaction, exactly once, whatever ended the
request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict

from flashserve import metrics
from flashserve.accounts.keys import Principal
from flashserve.accounts.ledger import UsageRecord
from flashserve.accounts.limits import Lease, LimiterUnavailable, RateLimited, Scope, scopes_of
from flashserve.accounts.pricing import TokenPrices
from flashserve.accounts.service import Accounts
from flashserve.errors import INVALID_REQUEST, RATE_LIMIT, FlashserveError, server_error
from flashserve.generation import Usage

log = logging.getLogger(__name__)
_WRITE_ATTEMPTS = 5


class Meter:
    def __init__(self, accounts: Accounts, principal: Principal, model: str, prices: TokenPrices,
                 request_id: str, lease: Lease, trace_id: str | None = None) -> None:
        self.accounts = accounts
        self.principal = principal
        self.model = model
        self.prices = prices
        self.request_id = request_id
        self.trace_id = trace_id  # the HTTP request's x-request-id, written in the usage row
        self._lease = lease
        self._started = time.monotonic()
        self.cost_pusd: int | None = None

    @classmethod
    async def admit(cls, accounts: Accounts, principal: Principal, model: str, prices: TokenPrices,
                    request_id: str, user: str | None = None, trace_id: str | None = None) -> Meter:
        balance = await accounts.ledger.balance(principal.account_id)
        if balance is None or balance <= 0:
            raise FlashserveError(402, "Insufficient balance: top up the account to continue.", INVALID_REQUEST,
                              None, "insufficient_balance")
        scopes = scopes_of(principal.key_id, principal.limits, principal.account_id, principal.account_limits,
                           user, principal.user_limits)
        lease = await _acquire(accounts, scopes)
        return cls(accounts, principal, model, prices, request_id, lease, trace_id)

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
        """The request never reached the model: free its limit slots, write nothing."""
        await self._lease.release(0)

    async def record(self, usage: Usage, status: str) -> int:
        """Write the usage row (once; later calls return the first cost)."""
        if self.cost_pusd is not None:
            return self.cost_pusd
        self.cost_pusd = cost = self.cost(usage)
        try:
            await self._lease.release(usage.total_tokens)
        except Exception:  # noqa: BLE001 - a limiter's failure must never cost the usage row
            log.exception("could not release the rate-limit lease of %s", self.request_id)
        rec = UsageRecord(
            request_id=self.request_id, account_id=self.principal.account_id, key_id=self.principal.key_id,
            model=self.model, prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens, reasoning_tokens=usage.reasoning_tokens, cost_pusd=cost,
            status=status, latency_ms=int((time.monotonic() - self._started) * 1000), x_request_id=self.trace_id,
        )
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                await self.accounts.ledger.record(rec)
                metrics.record_billing(self.model, self.principal.key_id, usage.prompt_tokens, usage.cached_tokens,
                                       usage.completion_tokens, usage.reasoning_tokens, cost)
                return cost
            except Exception:  # noqa: BLE001 - retried, then reported without losing the record
                if attempt == _WRITE_ATTEMPTS - 1:
                    # The row is logged in full (no key material in it) so an operator can replay it.
                    log.critical("could not write usage record; replay it: %s", asdict(rec), exc_info=True)
                    raise
                await asyncio.sleep(0.1 * 2**attempt)
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
