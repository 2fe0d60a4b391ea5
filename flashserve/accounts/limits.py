"""Rate limits: concurrent requests, requests per minute and tokens per minute, for each scope a request
falls in (its key, its account, and the account's end user named by the request's `user` field).

One small interface, `Limiter`, with two implementations:

- `MemoryLimiter` (here): this process's own counters. The default, for one gateway process.
- `RedisLimiter` (`accounts/redis_limits.py`): counters in a Redis every gateway process shares, so the
  limits hold across all of them (`FLASHSERVE_REDIS_URL`).

Checked before any work is done: a request over any limit of any of its scopes gets a 429 with
`retry-after`, and nothing is counted for it. Admission is all or nothing across scopes. Tokens count
when a request ends (prompt + completion), so TPM throttles the requests that follow a burst rather than
guessing a request's size up front.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flashserve.accounts.keys import KeyLimits

WINDOW_S = 60.0
_SWEEP_EVERY = 1024  # admissions between two sweeps of idle scopes


class RateLimited(Exception):
    """A scope is over one of its limits; the message names the scope and the limit."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class LimiterUnavailable(Exception):
    """The shared limit store cannot be reached and the limiter fails closed."""


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits a request counts against: `kind` is "key", "account" or "user" (an end user of an
    account), `id` what the counters are kept under."""

    kind: str
    id: str
    limits: KeyLimits

    @property
    def label(self) -> str:
        """The scope as a 429's message names it (ids only: never a key, never the end user's own string)."""
        if self.kind == "user":
            return "this end user (the request's user field)"
        return f"{self.kind} {self.id}"


def end_user_scope_id(account_id: str, user: str) -> str:
    """An end user's counters are the account's own (two accounts' users never share them) and keyed by a
    digest, so the id has a bounded length and the client's string is not stored in Redis."""
    return f"{account_id}:{hashlib.sha256(user.encode()).hexdigest()[:32]}"


def scopes_of(key_id: str, key_limits: KeyLimits, account_id: str, account_limits: KeyLimits,
              user: str | None, user_limits: KeyLimits) -> list[Scope]:
    """The scopes a request is limited in; a scope without any limit is left out (nothing to count)."""
    scopes = [Scope("key", key_id, key_limits), Scope("account", account_id, account_limits)]
    if user:
        scopes.append(Scope("user", end_user_scope_id(account_id, user), user_limits))
    return [s for s in scopes if not s.limits.unlimited]


def concurrency_refusal(scope: Scope) -> RateLimited:
    return RateLimited(f"Too many concurrent requests for {scope.label} "
                       f"(limit {scope.limits.max_concurrent}).", 1)


def rpm_refusal(scope: Scope, wait_s: float) -> RateLimited:
    return RateLimited(f"Rate limit reached for {scope.label}: {scope.limits.rpm} requests per minute.",
                       math.ceil(wait_s))


def tpm_refusal(scope: Scope, wait_s: float) -> RateLimited:
    return RateLimited(f"Rate limit reached for {scope.label}: {scope.limits.tpm} tokens per minute.",
                       math.ceil(wait_s))


class Lease(Protocol):
    """One admitted request's hold on its scopes; `release` once, with the tokens it used (later calls do
    nothing)."""

    async def release(self, tokens: int = 0) -> None: ...


class Limiter(Protocol):
    async def acquire(self, scopes: Sequence[Scope]) -> Lease:
        """Admit one request in every scope, or raise `RateLimited` (or `LimiterUnavailable`)."""
        ...

    async def close(self) -> None: ...


class NoLease:
    """A request limited in no scope: nothing to give back."""

    async def release(self, tokens: int = 0) -> None:
        return None

    def release_now(self, tokens: int = 0) -> None:
        return None


def make_limiter(redis_url: str | None, *, failure_mode: str = "open", lease_ttl_s: float = 30.0,
                 timeout_s: float = 1.0, prefix: str = "flashserve") -> Limiter:
    """The shared limiter over Redis when a URL is given, else this process's own."""
    if not redis_url:
        return MemoryLimiter()
    from flashserve.accounts.redis_limits import RedisLimiter  # only a Redis deployment needs the client

    return RedisLimiter(redis_url, failure_mode=failure_mode, lease_ttl_s=lease_ttl_s, timeout_s=timeout_s,
                        prefix=prefix)


# -- this process's counters ------------------------------------------------------------------------------
@dataclass(slots=True)
class _ScopeState:
    active: int = 0
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]

    def tpm_wait(self, tpm: int, now: float) -> float:
        """Seconds until enough tokens leave the window to get under the limit."""
        excess = self.token_sum - tpm + 1
        for stamp, tokens in self.tokens:
            excess -= tokens
            if excess <= 0:
                return stamp + WINDOW_S - now
        return WINDOW_S


class MemoryLimiter:
    """Counters in this process: exact for one gateway; with several, each holds its own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[tuple[str, str], _ScopeState] = {}
        self._lock = threading.Lock()
        self._admitted = 0

    async def acquire(self, scopes: Sequence[Scope]) -> Lease:
        return self.acquire_now(scopes)

    def _sweep(self, now: float) -> None:
        """Forget idle scopes (end users come and go), so the table does not grow without bound."""
        for name, state in list(self._states.items()):
            state.expire(now)
            if not state.active and not state.requests and not state.tokens:
                del self._states[name]

    def acquire_now(self, scopes: Sequence[Scope]) -> Lease:
        if not scopes:
            return NoLease()
        now = self._clock()
        with self._lock:
            states = [self._states.setdefault((s.kind, s.id), _ScopeState()) for s in scopes]
            for scope, state in zip(scopes, states, strict=True):  # check every scope before counting in any
                state.expire(now)
                limits = scope.limits
                if limits.max_concurrent is not None and state.active >= limits.max_concurrent:
                    raise concurrency_refusal(scope)
                if limits.rpm is not None and len(state.requests) >= limits.rpm:
                    raise rpm_refusal(scope, state.requests[len(state.requests) - limits.rpm] + WINDOW_S - now)
                if limits.tpm is not None and state.token_sum >= limits.tpm:
                    raise tpm_refusal(scope, state.tpm_wait(limits.tpm, now))
            for state in states:
                state.active += 1
                state.requests.append(now)
            self._admitted += 1
            if self._admitted % _SWEEP_EVERY == 0:
                self._sweep(now)
        return _MemoryLease(self, [(s.kind, s.id) for s in scopes])

    def _release(self, names: list[tuple[str, str]], tokens: int) -> None:
        now = self._clock()
        with self._lock:
            for name in names:
                state = self._states[name]
                state.active -= 1
                if tokens:
                    state.tokens.append((now, tokens))
                    state.token_sum += tokens

    async def close(self) -> None:
        return None


class _MemoryLease:
    def __init__(self, limiter: MemoryLimiter, names: list[tuple[str, str]]) -> None:
        self._limiter = limiter
        self._names = names
        self._released = False

    async def release(self, tokens: int = 0) -> None:
        self.release_now(tokens)

    def release_now(self, tokens: int = 0) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._names, tokens)
