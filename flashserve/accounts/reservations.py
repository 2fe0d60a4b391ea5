"""Reserved balances: what an admitted request may spend is held in the database before any model work,
and settled (the actual cost charged, the rest released) with its usage row, in one transaction.

Money moves only by SQL arithmetic on locked rows, so no number of requests or gateways can overspend:

- `reserve` holds the prompt at the cache-miss price plus the completion budget at the output price, moved
  from `balance_pusd` to `reserved_pusd` by a conditional `UPDATE ... WHERE balance_pusd >= amount`. In the
  common case (no spending cap, the whole budget fits) that one statement is all it takes. Otherwise it
  locks the account row (and the key's, when the key has a spending cap), reads what is free and clamps the
  budget to it before the same conditional move. The row lock is taken by a write first, which is also what
  makes SQLite serialize: its write lock is taken before the read instead of upgraded after it.
- `settle` deletes the reservation (`DELETE ... RETURNING`: of two settlers, say a late gateway and the
  reaper, exactly one gets the row), charges min(actual cost, held), releases the rest, spends granted
  credit first, and inserts the usage row, together. A request id without a reservation was settled already:
  settling is idempotent, which is what lets the outbox (`outbox.py`) replay a settlement safely.
- `cancel` releases a reservation whose request never reached the model (no usage row).
- `heartbeat` renews this gateway's reservations; `reap` settles those whose gateway stopped renewing them
  for `lease_s`, as status "reaped" with the usage known to the database: the prompt (its tokens, at the
  cache-miss price) and no completion. The customer pays for the prompt the model read, never for output
  nobody received, and the gateway's crash costs them nothing more.

The identity every account keeps at all times (checked by `audit`):

    balance_pusd + reserved_pusd + Σ usage cost_pusd = Σ credits (top-ups and grants)
    balance_pusd >= 0, reserved_pusd = Σ open reservations, 0 <= granted_pusd <= balance + reserved
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flashserve.accounts import pg_hot, sqlite_hot
from flashserve.accounts.clock import utcnow
from flashserve.accounts.db import write_transaction
from flashserve.accounts.pricing import TokenPrices, format_usd
from flashserve.accounts.sqlite_hot import Busy, HotStatement, SqliteHotPath, Transaction
from flashserve.accounts.tables import accounts, api_keys, reservations, topups, usage_records

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpendCaps:
    """A key's spending caps in pUSD per UTC day and per calendar month (UTC); None: no cap."""

    daily_pusd: int | None = None
    monthly_pusd: int | None = None

    def __post_init__(self) -> None:
        for name in ("daily_pusd", "monthly_pusd"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def any(self) -> bool:
        return self.daily_pusd is not None or self.monthly_pusd is not None


NO_CAPS = SpendCaps()


class CannotPay(Exception):
    """The prompt and one completion token do not fit in what is free; `cap` names the spending cap that
    binds ("daily" or "monthly"), None when it is the account's balance."""

    def __init__(self, message: str, cap: str | None = None) -> None:
        super().__init__(message)
        self.cap = cap


@dataclass(frozen=True, slots=True)
class Hold:
    """An open reservation: `amount_pusd` held for `request_id`, paying for `max_tokens` per choice."""

    request_id: str
    amount_pusd: int
    max_tokens: int
    clamped: bool  # max_tokens is below what was asked, because the money (or a cap) runs out there


@dataclass(frozen=True, slots=True)
class Charge:
    """One request's settlement, as written: the usage row's fields (cost_pusd: the full actual cost)."""

    request_id: str
    account_id: str
    key_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_pusd: int
    status: str
    latency_ms: int
    x_request_id: str | None = None  # the HTTP request's correlation id (migration 0005)

    def __post_init__(self) -> None:
        check_usage(self)

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


# "reaped": settled by another gateway's reaper after this one died mid-request.
STATUSES = ("ok", "error", "cancelled", "reaped")


def check_usage(row: Any) -> None:
    """A usage row's fields, checked with real errors (not asserts: `python -O` must not let a bad row
    reach the ledger)."""
    if row.status not in STATUSES:
        raise ValueError(f"usage status must be one of {STATUSES}, not {row.status!r}")
    if not 0 <= row.cached_tokens <= row.prompt_tokens:
        raise ValueError(f"cached_tokens {row.cached_tokens} outside [0, prompt_tokens {row.prompt_tokens}]")
    if not 0 <= row.reasoning_tokens <= row.completion_tokens:
        raise ValueError(f"reasoning_tokens {row.reasoning_tokens} outside "
                         f"[0, completion_tokens {row.completion_tokens}]")
    if row.cost_pusd < 0 or row.latency_ms < 0:
        raise ValueError("cost_pusd and latency_ms must not be negative")


def day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


# The request path's statements, built once. They run through SQLAlchemy on any database, or, on SQLite, on
# the event loop's thread (`sqlite_hot.py`), compiled once for sqlite3: the same SQL either way.
_a = accounts.c
# Move `amount` from the balance to reserved_pusd, if the balance is at least `at_least`.
TAKE = (sa.update(accounts).where(_a.id == sa.bindparam("account_id"), _a.balance_pusd >= sa.bindparam("at_least"))
        .values(balance_pusd=_a.balance_pusd - sa.bindparam("amount"),
                reserved_pusd=_a.reserved_pusd + sa.bindparam("amount")))
HOLD = sa.insert(reservations).values({c.name: sa.bindparam(c.name, type_=c.type) for c in reservations.c})
UNHOLD = (sa.delete(reservations).where(reservations.c.request_id == sa.bindparam("request_id"))
          .returning(reservations.c.account_id, reservations.c.amount_pusd))
# The settlement's arithmetic: `held` leaves reserved_pusd, its unspent part (`refund`) returns to the balance,
# and the charge spends granted credit first.
SETTLE = (sa.update(accounts).where(_a.id == sa.bindparam("account_id"))
          .values(reserved_pusd=_a.reserved_pusd - sa.bindparam("held"),
                  balance_pusd=_a.balance_pusd + sa.bindparam("refund"),
                  granted_pusd=sa.case((_a.granted_pusd > sa.bindparam("charged"),
                                        _a.granted_pusd - sa.bindparam("charged")), else_=sa.literal_column("0"))))
USAGE = sa.insert(usage_records).values({c.name: sa.bindparam(c.name, type_=c.type)
                                         for c in usage_records.c if c.name != "id"})
_HOT = {name: HotStatement.of(stmt) for name, stmt in
        (("take", TAKE), ("hold", HOLD), ("unhold", UNHOLD), ("settle", SETTLE), ("usage", USAGE))}


class Reservations:
    def __init__(self, engine: AsyncEngine, gateway_id: str, hot: SqliteHotPath | None = None) -> None:
        """`hot`: the loop-thread path for SQLite's request-path transactions (default: the one attached to
        the engine, if any; None: SQLAlchemy only)."""
        self.engine = engine
        self.gateway_id = gateway_id
        self.hot = hot or sqlite_hot.of(engine)
        self.pg_hot = pg_hot.of(engine)  # the same two transactions on PostgreSQL, one statement each

    # -- admission -----------------------------------------------------------------------------------------
    async def reserve(self, *, request_id: str, account_id: str, key_id: str, caps: SpendCaps, model: str,
                      prices: TokenPrices, prompt_tokens: int, max_tokens: int, n: int = 1) -> Hold:
        """Hold the request's worst-case cost, its completion budget clamped to what is free. Raises
        `CannotPay` when not even the prompt and one token per choice fit (nothing is held then)."""
        prompt_cost = prompt_tokens * prices.input_cache_miss
        per_token = prices.output * n
        now = utcnow()
        # The common case first: no spending cap and the whole budget fits, so nothing is read or clamped (the
        # balance test and the move are one atomic UPDATE: never below zero), on the loop's thread on SQLite.
        full = prompt_cost + max_tokens * per_token
        take = {"account_id": account_id, "amount": full, "at_least": max(full, 1)}
        hold = {"request_id": request_id, "account_id": account_id, "key_id": key_id, "model": model,
                "prompt_tokens": prompt_tokens, "prompt_cost_pusd": prompt_cost, "amount_pusd": full,
                "gateway_id": self.gateway_id, "created_at": now, "heartbeat_at": now}
        if not caps.any and self.hot is not None:
            with contextlib.suppress(Busy):  # another connection is writing: the async path below waits its turn
                if self.hot.run(lambda tx: _take_and_hold(tx, take, hold)):
                    return Hold(request_id, full, max_tokens, False)
        if not caps.any and self.pg_hot is not None and await self.pg_hot.reserve_whole(
                request_id=request_id, account_id=account_id, key_id=key_id, model=model,
                prompt_tokens=prompt_tokens, prompt_cost=prompt_cost, amount=full, at_least=max(full, 1),
                gateway_id=self.gateway_id, now=now):
            return Hold(request_id, full, max_tokens, False)
        async with write_transaction(self.engine) as conn:
            if not caps.any and (await conn.execute(TAKE, take)).rowcount == 1:
                await conn.execute(HOLD, hold)
                return Hold(request_id, full, max_tokens, False)
            await _lock(conn, accounts, accounts.c.id, account_id, accounts.c.reserved_pusd)
            balance = await conn.scalar(sa.select(accounts.c.balance_pusd).where(accounts.c.id == account_id))
            if balance is None:
                raise CannotPay("The account no longer exists.")
            balance = int(balance)
            need = prompt_cost + per_token
            if balance <= 0 or balance < need:
                raise CannotPay(f"Insufficient balance: this request needs at least ${format_usd(need)} (the prompt "
                                f"and one output token) and the account has ${format_usd(max(balance, 0))} free. "
                                "Top up the account to continue.")
            free, binding = balance, None
            if caps.any:
                await _lock(conn, api_keys, api_keys.c.id, key_id, api_keys.c.daily_cap_pusd)
                for name, cap, since in (("daily", caps.daily_pusd, day_start(now)),
                                         ("monthly", caps.monthly_pusd, month_start(now))):
                    if cap is None:
                        continue
                    left = cap - await _key_spend(conn, key_id, since)
                    if left < need:
                        raise CannotPay(f"This key's {name} spending cap of ${format_usd(cap)} is reached: "
                                        f"${format_usd(max(left, 0))} of it is left and this request needs at least "
                                        f"${format_usd(need)}.", cap=name)
                    if left < free:
                        free, binding = left, name
            tokens = max_tokens if per_token == 0 else min(max_tokens, (free - prompt_cost) // per_token)
            amount = prompt_cost + tokens * per_token
            if (await conn.execute(TAKE, {**take, "amount": amount, "at_least": amount})).rowcount != 1:
                # cannot happen under the row lock; never overspend if it does
                raise CannotPay("Insufficient balance: top up the account to continue.")
            await conn.execute(HOLD, {**hold, "amount_pusd": amount})
        if tokens < max_tokens:
            log.info("request %s: max_tokens clamped %d -> %d by the %s", request_id, max_tokens, tokens,
                     f"{binding} spending cap" if binding else "account's free balance")
        return Hold(request_id, amount, tokens, tokens < max_tokens)

    async def cancel(self, request_id: str) -> None:
        """Release a reservation whose request never reached the model: no charge, no usage row."""
        async with write_transaction(self.engine) as conn:
            row = (await conn.execute(sa.delete(reservations).where(reservations.c.request_id == request_id)
                                      .returning(reservations.c.account_id, reservations.c.amount_pusd))).first()
            if row is not None:
                await _move(conn, row.account_id, held=int(row.amount_pusd), charged=0)

    # -- settlement ----------------------------------------------------------------------------------------
    async def settle(self, charge: Charge) -> int | None:
        """Charge the actual cost (at most what was held), release the rest and write the usage row, in one
        transaction. Returns what was charged; None when the request was settled already (by an earlier
        attempt whose answer was lost, or by the reaper): nothing is written twice."""
        if self.hot is not None:
            with contextlib.suppress(Busy):  # another connection is writing: the async path below waits its turn
                return self.hot.run(lambda tx: _settle_in(tx, charge))
        if self.pg_hot is not None:
            charged = await self.pg_hot.settle(**{**charge.as_dict(), "created_at": utcnow()})
            if charged is not None and charged < charge.cost_pusd:
                _short(charge, held=charged)
            return charged
        async with write_transaction(self.engine) as conn:
            row = (await conn.execute(UNHOLD, {"request_id": charge.request_id})).first()
            if row is None:
                return None
            charged, move, usage = _settlement(charge, held=int(row.amount_pusd))
            await conn.execute(SETTLE, move)
            await conn.execute(USAGE, usage)
        return charged

    # -- gateways that died --------------------------------------------------------------------------------
    async def heartbeat(self) -> int:
        """Renew every reservation this gateway holds; returns how many."""
        async with write_transaction(self.engine) as conn:
            done = await conn.execute(sa.update(reservations).where(reservations.c.gateway_id == self.gateway_id)
                                      .values(heartbeat_at=utcnow()))
        return int(done.rowcount or 0)

    async def reap(self, lease_s: float, *, everyone_else: bool = False) -> int:
        """Settle the reservations of gateways silent for `lease_s` (or, `everyone_else`, of every other
        gateway: SQLite's single process at start-up) as "reaped": the prompt charged, no completion.
        Returns how many."""
        cutoff = utcnow() - timedelta(seconds=lease_s)
        stale = reservations.c.gateway_id != self.gateway_id
        if not everyone_else:
            stale = sa.and_(stale, reservations.c.heartbeat_at < cutoff)
        async with self.engine.connect() as conn:
            ids = list((await conn.execute(sa.select(reservations.c.request_id).where(stale).limit(500))).scalars())
        reaped = 0
        for request_id in ids:
            async with write_transaction(self.engine) as conn:
                row = (await conn.execute(sa.delete(reservations)
                                          .where(reservations.c.request_id == request_id, stale)
                                          .returning(*reservations.c))).first()
                if row is None:  # settled (or renewed) meanwhile
                    continue
                held = int(row.amount_pusd)
                charged = min(int(row.prompt_cost_pusd), held)
                await _move(conn, row.account_id, held=held, charged=charged)
                latency = max(0, int((utcnow() - row.created_at).total_seconds() * 1000))
                await conn.execute(sa.insert(usage_records).values(
                    request_id=row.request_id, account_id=row.account_id, key_id=row.key_id, model=row.model,
                    prompt_tokens=row.prompt_tokens, cached_tokens=0, completion_tokens=0, reasoning_tokens=0,
                    cost_pusd=charged, status="reaped", latency_ms=latency, created_at=utcnow()))
            reaped += 1
            log.warning("reaped reservation %s of gateway %s (silent for over %.0fs)", request_id,
                        row.gateway_id, lease_s)
        return reaped

    async def open_count(self, gateway_id: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(reservations)
        if gateway_id is not None:
            query = query.where(reservations.c.gateway_id == gateway_id)
        async with self.engine.connect() as conn:
            return int(await conn.scalar(query) or 0)


async def _lock(conn: AsyncConnection, table: sa.Table, id_column: sa.Column, ident: str,
                column: sa.Column) -> None:
    """Take the row's write lock with a no-op write: PostgreSQL locks the row until commit, SQLite takes
    its database write lock now (a read first and a write after could fail on a snapshot taken too early)."""
    await conn.execute(sa.update(table).where(id_column == ident).values({column.name: column}))


async def _key_spend(conn: AsyncConnection, key_id: str, since: datetime) -> int:
    """What a key has spent since `since` plus what its open reservations hold (all of them: a reservation
    made before midnight still counts today, so no window edge lets concurrency overshoot)."""
    charged = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(usage_records.c.cost_pusd), 0))
                                .where(usage_records.c.key_id == key_id, usage_records.c.created_at >= since))
    held = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(reservations.c.amount_pusd), 0))
                             .where(reservations.c.key_id == key_id))
    return int(charged or 0) + int(held or 0)


def _take_and_hold(tx: Transaction, take: dict[str, Any], hold: dict[str, Any]) -> bool:
    """The common case of `reserve` as one hot transaction: whether the whole budget was held."""
    if tx.execute(_HOT["take"], take).rowcount != 1:
        return False
    tx.execute(_HOT["hold"], hold)
    return True


def _settle_in(tx: Transaction, charge: Charge) -> int | None:
    """`Reservations.settle` as one hot transaction."""
    row = tx.execute(_HOT["unhold"], {"request_id": charge.request_id}).fetchone()
    if row is None:
        return None
    charged, move, usage = _settlement(charge, held=int(row[1]))
    tx.execute(_HOT["settle"], move)
    tx.execute(_HOT["usage"], usage)
    return charged


def _short(charge: Charge, held: int) -> None:
    # Only where the prompt was an estimate (a remote upstream's tokenizer is not ours).
    log.warning("request %s cost %d pUSD but held %d; charged what was held", charge.request_id,
                charge.cost_pusd, held)


def _settlement(charge: Charge, *, held: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """What settling `charge` against a hold of `held` charges, and the parameters of SETTLE and USAGE."""
    charged = min(charge.cost_pusd, held)
    if charged < charge.cost_pusd:
        _short(charge, held)
    move = {"account_id": charge.account_id, "held": held, "refund": held - charged, "charged": charged}
    return charged, move, {**charge.as_dict(), "cost_pusd": charged, "created_at": utcnow()}


async def _move(conn: AsyncConnection, account_id: str, *, held: int, charged: int) -> None:
    """The settlement's arithmetic (SETTLE) through SQLAlchemy."""
    await conn.execute(SETTLE, {"account_id": account_id, "held": held, "refund": held - charged, "charged": charged})


# -- the audit ---------------------------------------------------------------------------------------------
async def audit(engine: AsyncEngine, account_id: str | None = None) -> list[dict[str, Any]]:
    """Every account (or one) with its figures and the identities that must hold; `ok` is their conjunction.
    One SELECT, so one consistent snapshot (PostgreSQL's statement snapshot; SQLite's read transaction)."""
    a = accounts.c
    credits = (sa.select(topups.c.account_id, sa.func.sum(topups.c.amount_pusd).label("v"))
               .group_by(topups.c.account_id).subquery())
    charges = (sa.select(usage_records.c.account_id, sa.func.sum(usage_records.c.cost_pusd).label("v"))
               .group_by(usage_records.c.account_id).subquery())
    held = (sa.select(reservations.c.account_id, sa.func.sum(reservations.c.amount_pusd).label("v"),
                      sa.func.count().label("n"))
            .group_by(reservations.c.account_id).subquery())
    query = (sa.select(a.id, a.name, a.balance_pusd, a.reserved_pusd, a.granted_pusd,
                       sa.func.coalesce(credits.c.v, 0).label("credits"),
                       sa.func.coalesce(charges.c.v, 0).label("charges"),
                       sa.func.coalesce(held.c.v, 0).label("held"), sa.func.coalesce(held.c.n, 0).label("open"))
             .outerjoin(credits, credits.c.account_id == a.id).outerjoin(charges, charges.c.account_id == a.id)
             .outerjoin(held, held.c.account_id == a.id).order_by(a.created_at))
    if account_id is not None:
        query = query.where(a.id == account_id)
    async with engine.connect() as conn:
        rows = list(await conn.execute(query))
    out = []
    for r in rows:
        balance, reserved, granted = int(r.balance_pusd), int(r.reserved_pusd), int(r.granted_pusd)
        credited, charged, open_held = int(r.credits), int(r.charges), int(r.held)
        problems = []
        if balance < 0:
            problems.append("balance below zero")
        if reserved != open_held:
            problems.append(f"reserved_pusd {reserved} != Σ open reservations {open_held}")
        if balance + reserved + charged != credited:
            problems.append(f"balance + reserved + charges = {balance + reserved + charged} != credits {credited}")
        if not 0 <= granted <= balance + reserved:
            problems.append(f"granted_pusd {granted} outside [0, balance + reserved]")
        out.append({"account_id": r.id, "name": r.name, "balance_pusd": balance, "reserved_pusd": reserved,
                    "open_reservations": int(r.open), "granted_pusd": granted, "credits_pusd": credited,
                    "charges_pusd": charged, "ok": not problems, "problems": problems})
    return out
