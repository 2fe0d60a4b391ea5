"""Per-key rate limits: concurrent requests, requests per minute, tokens per minute.

Checked in memory before any work is done; a request over a limit gets a
429 with `retry-after`. Tokens count when a request ends (prompt +
completion), so TPM throttles the requests that follow a burst rather than
guessing a request's size up front.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from flashserve.accounts.keys import KeyLimits

WINDOW_S = 60.0


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


@dataclass(slots=True)
class _KeyState:
    active: int = 0
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    def acquire(self, key_id: str, limits: KeyLimits) -> Lease:
        """Admit one request or raise `RateLimited`."""
        now = self._clock()
        with self._lock:
            state = self._keys.setdefault(key_id, _KeyState())
            state.expire(now)
            if limits.max_concurrent is not None and state.active >= limits.max_concurrent:
                raise RateLimited(f"Too many concurrent requests for this key (limit {limits.max_concurrent}).", 1)
            if limits.rpm is not None and len(state.requests) >= limits.rpm:
                wait = state.requests[len(state.requests) - limits.rpm] + WINDOW_S - now
                raise RateLimited(f"Rate limit reached: {limits.rpm} requests per minute.", math.ceil(wait))
            if limits.tpm is not None and state.token_sum >= limits.tpm:
                wait = self._tpm_wait(state, limits.tpm, now)
                raise RateLimited(f"Rate limit reached: {limits.tpm} tokens per minute.", math.ceil(wait))
            state.active += 1
            state.requests.append(now)
        return Lease(self, key_id)

    @staticmethod
    def _tpm_wait(state: _KeyState, tpm: int, now: float) -> float:
        """Seconds until enough tokens leave the window to get under the limit."""
        excess = state.token_sum - tpm + 1
        for stamp, tokens in state.tokens:
            excess -= tokens
            if excess <= 0:
                return stamp + WINDOW_S - now
        return WINDOW_S

    def _release(self, key_id: str, tokens: int) -> None:
        now = self._clock()
        with self._lock:
            state = self._keys[key_id]
            state.active -= 1
            if tokens:
                state.tokens.append((now, tokens))
                state.token_sum += tokens


class Lease:
    """One admitted request; `release` exactly once, with the tokens it used."""

    def __init__(self, limiter: RateLimiter, key_id: str) -> None:
        self._limiter = limiter
        self._key_id = key_id
        self._released = False

    def release(self, tokens: int = 0) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._key_id, tokens)
