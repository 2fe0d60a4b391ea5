"""Admission and settlement of one request.

`Meter.admit` runs before any model work: a key over its limits gets 429; then the request's worst-case
cost is reserved in the database (`accounts/reservations.py`): the prompt at the cache-miss price plus
its completion budget at the output price, `max_tokens` clamped to what the account (and the key's
spending caps) can pay. When not even the prompt and one token fit: 402 `insufficient_balance` (or
`spending_cap_exceeded`, naming the cap). A ledger that cannot be reached: 503 `ledger_unavailable`.

Once the backend has accepted the request, `Meter.record` prices the engine's token counts and settles:
the actual cost charged, the rest released and the usage row written, in one transaction, exactly once,
whatever ended the request; when the database is away, through the durable outbox.
"""

from __future__ import annotations

import logging
import time

from flashserve.accounts.keys import Principal
from flashserve.accounts.limits import Lease, RateLimited
from flashserve.accounts.pricing import TokenPrices
from flashserve.accounts.reservations import CannotPay, Charge, Hold
from flashserve.accounts.service import Accounts
from flashserve.errors import INVALID_REQUEST, RATE_LIMIT, FlashserveError, server_error
from flashserve.generation import Usage

log = logging.getLogger(__name__)


class Meter:
    def __init__(self, accounts: Accounts, principal: Principal, model: str, prices: TokenPrices,
                 request_id: str, lease: Lease, hold: Hold) -> None:
        self.accounts = accounts
        self.principal = principal
        self.model = model
        self.prices = prices
        self.request_id = request_id
        self.hold = hold
        self._lease = lease
        self._started = time.monotonic()
        self.cost_pusd: int | None = None

    @classmethod
    async def admit(cls, accounts: Accounts, principal: Principal, model: str, prices: TokenPrices,
                    request_id: str, *, prompt_tokens: int, max_tokens: int, n: int = 1) -> Meter:
        """Limits, then the reservation. `max_tokens` is the budget per choice before the money clamps it;
        the admitted budget is `meter.hold.max_tokens`."""
        try:
            lease = accounts.limiter.acquire(principal.key_id, principal.limits)
        except RateLimited as exc:
            raise FlashserveError(429, str(exc), RATE_LIMIT, None, "rate_limit_exceeded",
                                  headers={"retry-after": str(exc.retry_after)}) from None
        try:
            hold = await accounts.reservations.reserve(
                request_id=request_id, account_id=principal.account_id, key_id=principal.key_id,
                caps=principal.caps, model=model, prices=prices, prompt_tokens=prompt_tokens,
                max_tokens=max_tokens, n=n)
        except CannotPay as exc:
            lease.release(0)
            code = "insufficient_balance" if exc.cap is None else "spending_cap_exceeded"
            raise FlashserveError(402, str(exc), INVALID_REQUEST, None, code) from None
        except Exception as exc:
            lease.release(0)
            log.error("ledger unreachable at admission of %s: %s", request_id, type(exc).__name__)
            raise server_error(503, "The billing ledger is unavailable; retry shortly.", "ledger_unavailable",
                               retry_after_s=2) from None
        return cls(accounts, principal, model, prices, request_id, lease, hold)

    def cost(self, usage: Usage) -> int:
        return self.prices.cost(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)

    async def release_unused(self) -> None:
        """The request never reached the model: free its limit slot and its reservation, write nothing."""
        self._lease.release(0)
        await self.accounts.cancel(self.request_id)

    async def record(self, usage: Usage, status: str) -> int:
        """Settle (once; later calls return the first cost): the usage row and the charge, or, with the
        database away, the outbox entry that will write them."""
        if self.cost_pusd is not None:
            return self.cost_pusd
        self.cost_pusd = cost = self.cost(usage)
        self._lease.release(usage.total_tokens)
        charge = Charge(
            request_id=self.request_id, account_id=self.principal.account_id, key_id=self.principal.key_id,
            model=self.model, prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens, reasoning_tokens=usage.reasoning_tokens, cost_pusd=cost,
            status=status, latency_ms=int((time.monotonic() - self._started) * 1000),
        )
        charged = await self.accounts.settle(charge)
        if charged is not None and charged != cost:
            self.cost_pusd = cost = charged
        return cost
