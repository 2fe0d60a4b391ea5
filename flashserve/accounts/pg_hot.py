"""The request path's ledger transactions on PostgreSQL: each one statement, one round trip, via asyncpg.

Why: through SQLAlchemy's async engine a reservation took five round trips (the pool's ping, BEGIN, the
conditional UPDATE, the INSERT, COMMIT) and a settlement six, each behind a greenlet switch and
SQLAlchemy's statement machinery: ~5 ms of the gateway's CPU per request, its largest part (README
"Gateway overhead"). Here each is a single statement whose data-modifying CTEs PostgreSQL runs as one
implicit transaction (all or nothing, committed before the answer comes back), prepared once per
connection by asyncpg. The SQL is `reservations.py`'s, spelled for PostgreSQL:

- `reserve_whole`: the common case of `Reservations.reserve` (no spending cap, the whole budget fits):
  move the amount from the balance to reserved_pusd with the same conditional UPDATE (`WHERE balance_pusd
  >= amount`, re-checked by PostgreSQL after any concurrent update of the row: never below zero) and
  insert the reservation from its result, so no row means nothing was held.
- `settle`: `Reservations.settle`: delete the reservation (of two settlers exactly one gets the row),
  move min(cost, held) out of reserved_pusd and the rest back to the balance (granted credit spent
  first), and insert the usage row, together; a request id without a reservation writes nothing.

Anything else (caps, clamping, cancel, the reaper, reads) stays on SQLAlchemy. The pool is small and
separate from SQLAlchemy's; its connections time out like the engine's (10 s), so a database that is away
fails a request in bounded time, and the callers' handling is unchanged (503 at admission, the outbox at
settlement).
"""

from __future__ import annotations

import weakref
from datetime import datetime

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

RESERVE_WHOLE = """
WITH took AS (
    UPDATE accounts SET balance_pusd = balance_pusd - $3::bigint, reserved_pusd = reserved_pusd + $3::bigint
    WHERE id = $2::varchar AND balance_pusd >= $4::bigint
    RETURNING id)
INSERT INTO reservations (request_id, account_id, key_id, model, prompt_tokens, prompt_cost_pusd, amount_pusd,
                          gateway_id, created_at, heartbeat_at)
SELECT $1::varchar, id, $5::varchar, $6::varchar, $7::integer, $8::bigint, $3::bigint, $9::varchar,
       $10::timestamp, $10::timestamp
FROM took
RETURNING request_id
"""

SETTLE = """
WITH gone AS (
    DELETE FROM reservations WHERE request_id = $1::varchar RETURNING amount_pusd),
charge AS (
    SELECT amount_pusd AS held, LEAST($9::bigint, amount_pusd) AS charged FROM gone),
moved AS (
    UPDATE accounts SET reserved_pusd = reserved_pusd - charge.held,
                        balance_pusd = balance_pusd + (charge.held - charge.charged),
                        granted_pusd = CASE WHEN granted_pusd > charge.charged
                                            THEN granted_pusd - charge.charged ELSE 0 END
    FROM charge WHERE accounts.id = $2::varchar)
INSERT INTO usage_records (request_id, account_id, key_id, model, prompt_tokens, cached_tokens,
                           completion_tokens, reasoning_tokens, cost_pusd, status, latency_ms, created_at,
                           x_request_id)
SELECT $1::varchar, $2::varchar, $3::varchar, $4::varchar, $5::integer, $6::integer, $7::integer, $8::integer,
       charge.charged, $10::varchar, $11::integer, $12::timestamp, $13::varchar
FROM charge
RETURNING cost_pusd
"""


class PgHotPath:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def _acquire_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=10, timeout=10,
                                                   command_timeout=30)
        return self._pool

    async def reserve_whole(self, *, request_id: str, account_id: str, key_id: str, model: str,
                            prompt_tokens: int, prompt_cost: int, amount: int, at_least: int, gateway_id: str,
                            now: datetime) -> bool:
        """Hold `amount` if the balance is at least `at_least`; whether it did."""
        pool = await self._acquire_pool()
        held = await pool.fetchval(RESERVE_WHOLE, request_id, account_id, amount, at_least, key_id, model,
                                   prompt_tokens, prompt_cost, gateway_id, now)
        return held is not None

    async def settle(self, *, request_id: str, account_id: str, key_id: str, model: str, prompt_tokens: int,
                     cached_tokens: int, completion_tokens: int, reasoning_tokens: int, cost_pusd: int, status: str,
                     latency_ms: int, created_at: datetime, x_request_id: str | None) -> int | None:
        """What was charged; None when the request was settled already (nothing written)."""
        pool = await self._acquire_pool()
        charged = await pool.fetchval(SETTLE, request_id, account_id, key_id, model, prompt_tokens, cached_tokens,
                                      completion_tokens, reasoning_tokens, cost_pusd, status, latency_ms,
                                      created_at, x_request_id)
        return None if charged is None else int(charged)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def dsn_of(engine: AsyncEngine) -> str:
    """asyncpg's DSN for the database an SQLAlchemy `postgresql+asyncpg://` engine reaches."""
    return make_url(engine.url).set(drivername="postgresql").render_as_string(hide_password=False)


_ATTACHED: weakref.WeakKeyDictionary[AsyncEngine, PgHotPath] = weakref.WeakKeyDictionary()


def attach(engine: AsyncEngine) -> None:
    """Open (lazily, on first use) the hot path of the PostgreSQL database `engine` reaches."""
    _ATTACHED[engine] = PgHotPath(dsn_of(engine))


def of(engine: AsyncEngine) -> PgHotPath | None:
    """The hot path opened with this engine: another engine (another database) has none."""
    return _ATTACHED.get(engine)


async def detach(engine: AsyncEngine) -> None:
    hot = _ATTACHED.pop(engine, None)
    if hot is not None:
        await hot.close()
