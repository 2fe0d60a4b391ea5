"""Rate limits shared by every gateway process: the `Limiter` of `accounts/limits.py` over one Redis.

Each scope (a key, an account, an account's end user) has three sorted sets under
`<prefix>:<kind>:<id>`:

- `:req`   one member per admitted request, scored by its admission time (ms): a sliding-window log,
           so RPM is exact over any 60 s, not per calendar minute;
- `:tok`   one member `<lease>:<tokens>` per finished request, scored by its end: TPM the same way;
- `:slots` one member per running request, scored by when its lease expires: concurrency.

Admission is one Lua script: it drops expired entries, checks every scope's limits and, only if all
pass, counts the request in all of them, atomically (Redis runs a script alone). The time is Redis's
own (`TIME`), so the gateways' clocks need not agree. A running request renews its slots every third of
the lease TTL; a gateway that dies stops renewing, and its slots expire after at most one TTL, so a
crashed gateway cannot hold a key's concurrency forever. Every key also carries a Redis expiry, so idle
scopes leave nothing behind.

If Redis cannot be reached (connection refused, timeout), `failure_mode` decides:

- "closed": the request is refused (`LimiterUnavailable`: 503, retry-after), nothing runs unmetered;
- "open": the request is admitted under this process's own counters (`MemoryLimiter`), as if there were
  one gateway, and a warning is logged (the Redis URL's host and port only: never its password).

The keys of one Redis are assumed to live on one node (a plain Redis or a primary with replicas, not a
Redis Cluster, where one script may not touch keys in several slots).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from flashserve.accounts.limits import (
    WINDOW_S,
    Lease,
    LimiterUnavailable,
    MemoryLimiter,
    NoLease,
    Scope,
    concurrency_refusal,
    rpm_refusal,
    tpm_refusal,
)

log = logging.getLogger(__name__)
FAILURE_MODES = ("open", "closed")
_WARN_EVERY_S = 10.0
_RENEWERS: set[asyncio.Task[None]] = set()  # at most one "Redis unreachable" warning per this many seconds

# KEYS: per scope :req, :tok, :slots. ARGV: lease id, lease TTL (ms), window (ms), then per scope
# max_concurrent, rpm, tpm (0: unlimited). Returns {} when admitted, else {scope number (1-based), which
# limit, ms until it may pass}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, ttl, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS / 3
for i = 0, n - 1 do
  local req, tok, slots = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local conc, rpm, tpm = tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i]), tonumber(ARGV[6 + 3 * i])
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', req, '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
  if conc > 0 and redis.call('ZCARD', slots) >= conc then
    return {i + 1, 'concurrency', 1000}
  end
  if rpm > 0 then
    local count = redis.call('ZCARD', req)
    if count >= rpm then
      local oldest = redis.call('ZRANGE', req, count - rpm, count - rpm, 'WITHSCORES')
      return {i + 1, 'rpm', tonumber(oldest[2]) + window - now}
    end
  end
  if tpm > 0 then
    local entries = redis.call('ZRANGE', tok, 0, -1, 'WITHSCORES')
    local sum = 0
    for j = 1, #entries, 2 do
      sum = sum + tonumber(string.match(entries[j], ':(%d+)$'))
    end
    if sum >= tpm then
      local excess = sum - tpm + 1
      for j = 1, #entries, 2 do
        excess = excess - tonumber(string.match(entries[j], ':(%d+)$'))
        if excess <= 0 then
          return {i + 1, 'tpm', tonumber(entries[j + 1]) + window - now}
        end
      end
      return {i + 1, 'tpm', window}
    end
  end
end
for i = 0, n - 1 do
  local req, slots = KEYS[3 * i + 1], KEYS[3 * i + 3]
  if tonumber(ARGV[4 + 3 * i]) > 0 then
    redis.call('ZADD', slots, now + ttl, lease)
    redis.call('PEXPIRE', slots, ttl)
  end
  if tonumber(ARGV[5 + 3 * i]) > 0 then
    redis.call('ZADD', req, now, lease)
    redis.call('PEXPIRE', req, window)
  end
end
return {}
"""

# KEYS: per scope :slots. ARGV: lease id, TTL (ms). Pushes the lease's expiry one TTL ahead where it still
# holds a slot (XX: a slot that already expired is not taken back). Returns how many slots it renewed.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local renewed = 0
for i = 1, #KEYS do
  renewed = renewed + redis.call('ZADD', KEYS[i], 'XX', 'CH', now + ttl, ARGV[1])
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return renewed
"""

# KEYS: per scope :tok, :slots. ARGV: lease id, tokens, window (ms), then per scope 1 when it has a TPM.
# Frees the lease's slots and counts its tokens where a TPM limit wants them.
RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, tokens, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 0, #KEYS / 2 - 1 do
  local tok, slots = KEYS[2 * i + 1], KEYS[2 * i + 2]
  redis.call('ZREM', slots, lease)
  if tokens > 0 and tonumber(ARGV[4 + i]) > 0 then
    redis.call('ZADD', tok, now, lease .. ':' .. tokens)
    redis.call('PEXPIRE', tok, window)
  end
end
return 1
"""


def redacted(url: str) -> str:
    """The Redis URL as logs may show it: scheme, host and port; never a user name or password."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


class RedisLimiter:
    def __init__(self, url: str, *, failure_mode: str = "open", lease_ttl_s: float = 30.0,
                 timeout_s: float = 1.0, prefix: str = "flashserve", window_s: float = WINDOW_S) -> None:
        if failure_mode not in FAILURE_MODES:
            raise ValueError(f"failure_mode must be one of {FAILURE_MODES}, not {failure_mode!r}")
        self.failure_mode = failure_mode
        self.lease_ttl_ms = max(1, int(lease_ttl_s * 1000))
        self.window_ms = int(window_s * 1000)
        self.prefix = prefix
        self.where = redacted(url)
        self.fallback = MemoryLimiter()  # fail-open admissions are still held to this process's limits
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                             retry_on_timeout=False)
        self._acquire = self.redis.register_script(ACQUIRE)
        self._renew = self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)
        self._last_warning = 0.0

    def _keys(self, scope: Scope) -> tuple[str, str, str]:
        base = f"{self.prefix}:{scope.kind}:{scope.id}"
        return f"{base}:req", f"{base}:tok", f"{base}:slots"

    async def acquire(self, scopes: Sequence[Scope]) -> Lease:
        if not scopes:
            return NoLease()
        lease_id = uuid.uuid4().hex
        keys: list[str] = []
        args: list[int | str] = [lease_id, self.lease_ttl_ms, self.window_ms]
        for scope in scopes:
            keys.extend(self._keys(scope))
            args.extend(limit or 0 for limit in (scope.limits.max_concurrent, scope.limits.rpm, scope.limits.tpm))
        try:
            refused = await self._acquire(keys=keys, args=args)
        except (TimeoutError, RedisError, OSError) as exc:
            return self._unreachable(exc, scopes)
        if refused:
            index, which, wait_ms = int(refused[0]) - 1, _text(refused[1]), max(0, int(refused[2]))
            scope = scopes[index]
            if which == "concurrency":
                raise concurrency_refusal(scope)
            raise (rpm_refusal if which == "rpm" else tpm_refusal)(scope, wait_ms / 1000)
        return RedisLease(self, lease_id, list(scopes))

    def _unreachable(self, exc: BaseException, scopes: Sequence[Scope]) -> Lease:
        self.warn(f"the shared rate-limit store at {self.where} is unreachable ({type(exc).__name__}); "
                  + ("refusing requests (redis_failure_mode = closed)" if self.failure_mode == "closed"
                     else "admitting requests under this process's own limits (redis_failure_mode = open)"))
        if self.failure_mode == "closed":
            raise LimiterUnavailable("The rate-limit store is unreachable.") from None
        return self.fallback.acquire_now(scopes)

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning(message)

    async def close(self) -> None:
        await self.redis.aclose()


class RedisLease:
    """A request admitted in Redis: its slots are renewed in the background until `release`."""

    def __init__(self, limiter: RedisLimiter, lease_id: str, scopes: list[Scope]) -> None:
        self._limiter = limiter
        self.id = lease_id
        self._scopes = scopes
        self._slot_keys = [limiter._keys(s)[2] for s in scopes if s.limits.max_concurrent]
        self._released = False
        self._renewer = asyncio.create_task(self._renew_forever()) if self._slot_keys else None
        if self._renewer is not None:  # held until done: the loop keeps only weak references to tasks
            _RENEWERS.add(self._renewer)
            self._renewer.add_done_callback(_RENEWERS.discard)

    async def _renew_forever(self) -> None:
        # Stops on the `_released` flag, not only on cancellation: a cancel that lands while redis-py's own
        # socket timeout fires can come out as a TimeoutError, which this loop would otherwise outlive.
        limiter = self._limiter
        while not self._released:
            await asyncio.sleep(limiter.lease_ttl_ms / 3000)
            if self._released:
                return
            try:
                renewed = await limiter._renew(keys=self._slot_keys, args=[self.id, limiter.lease_ttl_ms])
                if int(renewed) < len(self._slot_keys) and not self._released:
                    # Not renewed for a whole TTL (this process stalled, or Redis lost it): the slot went to
                    # another request, so this one runs beyond the concurrency limit until it ends.
                    limiter.warn("a concurrency lease expired before its request ended; raise "
                                 "redis_lease_ttl_s if this process stalls for that long")
            except (TimeoutError, RedisError, OSError) as exc:
                limiter.warn(f"could not renew a concurrency lease at {limiter.where} ({type(exc).__name__}); "
                             "it expires after its TTL unless a renewal gets through")

    async def release(self, tokens: int = 0) -> None:
        if self._released:
            return
        self._released = True
        if self._renewer is not None:
            # Not awaited: the release must never wait on a renewal in flight. A renewal that lands after
            # the release's ZREM cannot bring the slot back (ZADD XX only updates a member that exists).
            self._renewer.cancel()
        limiter = self._limiter
        keys: list[str] = []
        flags: list[int] = []
        for scope in self._scopes:
            _, tok, slots = limiter._keys(scope)
            keys.extend((tok, slots))
            flags.append(1 if scope.limits.tpm else 0)
        try:
            await limiter._release(keys=keys, args=[self.id, max(0, tokens), limiter.window_ms, *flags])
        except (TimeoutError, RedisError, OSError) as exc:
            # The slots expire with their TTL; the tokens go uncounted: a missed release never holds a slot.
            limiter.warn(f"could not release a lease at {limiter.where} ({type(exc).__name__}); its slots "
                         "expire after the lease TTL")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
