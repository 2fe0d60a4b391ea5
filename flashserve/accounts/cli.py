"""`flashserve accounts|keys|usage`: manage accounts, keys and balances, and read usage,
directly on the database (the same one the server uses; SQLite's WAL mode lets both run at once)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from flashserve.accounts.clock import parse_instant
from flashserve.accounts.keys import KeyLimits
from flashserve.accounts.ledger import GROUPINGS
from flashserve.accounts.pricing import pusd_from_usd
from flashserve.accounts.reservations import SpendCaps
from flashserve.accounts.service import Accounts
from flashserve.settings import Settings

accounts_app = typer.Typer(no_args_is_help=True, help="Accounts and balances.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys.")


def _console() -> Console:
    """A console made per command, so it measures the terminal (or $COLUMNS) as it is when the command runs."""
    return Console(soft_wrap=True)


T = TypeVar("T")

DataDir = Annotated[Path | None, typer.Option(help="Server data directory (holds the SQLite database).")]
DatabaseUrl = Annotated[str | None, typer.Option(help="Database URL (overrides --data-dir).")]


def _run(data_dir: Path | None, database_url: str | None, work: Callable[[Accounts], Awaitable[T]]) -> T:
    settings = Settings.load(data_dir=data_dir, database_url=database_url)

    async def main() -> T:
        async with Accounts(settings.resolved_database_url) as accounts:
            return await work(accounts)

    return asyncio.run(main())


def _fail(message: str) -> typer.Exit:
    _console().print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


# Columns holding ids (and a key's prefix): never wrapped, never cut, so they can be copied into the next command.
ID_COLUMNS = frozenset({"id", "account_id", "key_id", "prefix", "group"})

JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON (a list of objects) instead of a table.")]


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    cells = [["" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows]
    for i, column in enumerate(columns):
        if column in ID_COLUMNS:
            widest = max([len(column), *(len(r[i]) for r in cells)])
            table.add_column(column, no_wrap=True, min_width=widest)
        else:
            table.add_column(column, overflow="fold")
    for r in cells:
        table.add_row(*r)
    return table


def _show(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Prints the rows as a table; when that table would not fit the terminal, one `field  value` block per
    row instead (readable at 80 columns, ids whole) rather than squeezing columns until rich cuts an id."""
    console = _console()
    table = _table(title, rows, columns)
    if console.measure(table, options=console.options.update_width(10**6)).maximum <= console.width:
        console.print(table)
        return
    console.print(f"[italic]{title}[/italic]")
    for row in rows:
        block = Table(show_header=False, box=box.SIMPLE, pad_edge=False)
        block.add_column(style="bold", no_wrap=True)
        block.add_column(overflow="fold")
        for column in columns:
            block.add_row(column, "" if row.get(column) is None else str(row.get(column)))
        console.print(block)


def _print_json(rows: list[dict[str, Any]]) -> None:
    """JSON for scripts: plain stdout, no markup, no wrapping."""
    print(json.dumps(rows, indent=2, default=str))


# -- accounts ----------------------------------------------------------------------------
@accounts_app.command("create")
def accounts_create(name: str, balance_usd: Annotated[str, typer.Option(help="Opening balance in USD.")] = "0",
                    data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Create an account."""
    async def work(accounts: Accounts) -> dict[str, Any] | None:
        if await accounts.ledger.account_by_name(name) is not None:
            return None
        return await accounts.ledger.create_account(name, pusd_from_usd(balance_usd))

    account = _run(data_dir, database_url, work)
    if account is None:
        raise _fail(f"an account named {name!r} already exists")
    _show("account created", [account], ["id", "name", "balance_usd", "created_at"])


@accounts_app.command("top-up")
def accounts_top_up(account_id: str, amount_usd: str, note: str = "", data_dir: DataDir = None,
                    database_url: DatabaseUrl = None) -> None:
    """Add credit to an account's balance."""
    amount = pusd_from_usd(amount_usd)
    if amount <= 0:
        raise _fail("the amount must be positive")
    account = _run(data_dir, database_url, lambda a: a.ledger.top_up(account_id, amount, note))
    if account is None:
        raise _fail(f"no account {account_id!r}")
    _show("balance", [account], ["id", "name", "balance_usd"])


@accounts_app.command("grant")
def accounts_grant(account_id: str, amount_usd: str, note: str = "", data_dir: DataDir = None,
                   database_url: DatabaseUrl = None) -> None:
    """Add promotional credit: kept apart from topped-up money, and spent first."""
    amount = pusd_from_usd(amount_usd)
    if amount <= 0:
        raise _fail("the amount must be positive")
    account = _run(data_dir, database_url, lambda a: a.ledger.grant(account_id, amount, note))
    if account is None:
        raise _fail(f"no account {account_id!r}")
    _show("balance", [account], ["id", "name", "balance_usd", "granted_usd", "topped_up_usd"])


@accounts_app.command("audit")
def accounts_audit(account_id: Annotated[str | None, typer.Argument()] = None, data_dir: DataDir = None,
                   database_url: DatabaseUrl = None) -> None:
    """Check the ledger: balance >= 0, balance + reserved + charges = credits, reserved = open reservations.
    Exits 1 when any account breaks one."""
    async def work(accounts: Accounts) -> list[dict[str, Any]]:
        if account_id is None:
            return await accounts.ledger.audit_all()
        return [await accounts.ledger.audit(account_id)] if await accounts.ledger.get_account(account_id) else []

    rows = _run(data_dir, database_url, work)
    if account_id is not None and not rows:
        raise _fail(f"no account {account_id!r}")
    for row in rows:
        row["problems"] = "; ".join(row["problems"]) or "-"
    _show("ledger audit", rows, ["account_id", "name", "balance_pusd", "reserved_pusd", "open_reservations",
                                 "granted_pusd", "credits_pusd", "charges_pusd", "ok", "problems"])
    if not all(row["ok"] for row in rows):
        raise _fail("the ledger is inconsistent (see problems)")
    _console().print(f"ledger consistent: {len(rows)} account(s)")


@accounts_app.command("show")
def accounts_show(account_id: Annotated[str | None, typer.Argument()] = None, data_dir: DataDir = None,
                  database_url: DatabaseUrl = None, as_json: JsonOutput = False) -> None:
    """Show one account (or all) with its balance."""
    async def work(accounts: Accounts) -> list[dict[str, Any]]:
        if account_id is None:
            return await accounts.ledger.list_accounts()
        account = await accounts.ledger.get_account(account_id)
        return [account] if account else []

    rows = _run(data_dir, database_url, work)
    if account_id is not None and not rows:
        raise _fail(f"no account {account_id!r}")
    if as_json:
        _print_json(rows)
        return
    _show("accounts", rows, ["id", "name", "balance_usd", "balance_pusd", "reserved_usd", "granted_usd",
                             "topped_up_usd", "created_at"])


Limit = Annotated[int | None, typer.Option(min=0, help="0: unlimited; unset: unchanged.")]


def _limit_changes(**values: int | None) -> dict[str, int | None]:
    """The options given, 0 meaning unlimited (NULL); options not given are left as they are."""
    return {name: (value or None) for name, value in values.items() if value is not None}


@accounts_app.command("limits")
def accounts_limits(account_id: str, max_concurrent: Limit = None, rpm: Limit = None, tpm: Limit = None,
                    user_max_concurrent: Limit = None, user_rpm: Limit = None, user_tpm: Limit = None,
                    data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Set an account's limits: over all its keys together, and (--user-*) for each end user, told apart by
    the requests' `user` field. Shown after the change."""
    changes = _limit_changes(max_concurrent=max_concurrent, rpm=rpm, tpm=tpm,
                             user_max_concurrent=user_max_concurrent, user_rpm=user_rpm, user_tpm=user_tpm)
    account = _run(data_dir, database_url, lambda a: a.ledger.set_limits(account_id, changes))
    if account is None:
        raise _fail(f"no account {account_id!r}")
    _show("account limits", [account], ["id", "name", "max_concurrent", "rpm", "tpm", "user_max_concurrent",
                                        "user_rpm", "user_tpm"])


# -- keys --------------------------------------------------------------------------------
@keys_app.command("create")
def keys_create(
    account_id: str,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "key",
    expires_at: Annotated[str | None, typer.Option(help="ISO 8601 expiry (UTC).")] = None,
    max_concurrent: Annotated[int | None, typer.Option(min=1)] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    daily_cap_usd: Annotated[str | None, typer.Option(help="Spending cap per UTC day, USD.")] = None,
    monthly_cap_usd: Annotated[str | None, typer.Option(help="Spending cap per calendar month, USD.")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a key. It is printed once and cannot be shown again."""
    caps = _caps(daily_cap_usd, monthly_cap_usd)
    expires = parse_instant(expires_at) if expires_at else None

    async def work(accounts: Accounts) -> tuple[str, dict[str, Any]] | None:
        if await accounts.ledger.get_account(account_id) is None:
            return None
        return await accounts.keys.create(account_id, name, expires, KeyLimits(max_concurrent, rpm, tpm), caps=caps)

    created = _run(data_dir, database_url, work)
    if created is None:
        raise _fail(f"no account {account_id!r}")
    key, view = created
    _show("key created", [view], ["id", "name", "prefix", "account_id", "expires_at"])
    _console().print(f"key: [bold]{key}[/bold]  (shown once; store it now)")


@keys_app.command("list")
def keys_list(account_id: Annotated[str | None, typer.Option()] = None, data_dir: DataDir = None,
              database_url: DatabaseUrl = None, as_json: JsonOutput = False) -> None:
    """List keys (never the keys themselves)."""
    rows = _run(data_dir, database_url, lambda a: a.keys.list(account_id))
    if as_json:
        _print_json(rows)
        return
    _show("keys", rows, ["id", "name", "prefix", "account_id", "created_at", "expires_at", "revoked_at",
                         "max_concurrent", "rpm", "tpm", "daily_cap_usd", "monthly_cap_usd"])


def _caps(daily_usd: str | None, monthly_usd: str | None) -> SpendCaps:
    values = [None if v is None or v.lower() == "none" else pusd_from_usd(v) for v in (daily_usd, monthly_usd)]
    if any(v is not None and v < 0 for v in values):
        raise _fail("a spending cap must not be negative")
    return SpendCaps(*values)


@keys_app.command("set-caps")
def keys_set_caps(
    key_id: str,
    daily_cap_usd: Annotated[str | None, typer.Option(help="Per UTC day, USD ('none' or absent: no cap).")] = None,
    monthly_cap_usd: Annotated[str | None, typer.Option(help="Per calendar month, USD.")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Replace a key's spending caps (charges plus open reservations; past one, requests get 402)."""
    caps = _caps(daily_cap_usd, monthly_cap_usd)
    view = _run(data_dir, database_url, lambda a: a.keys.set_caps(key_id, caps))
    if view is None:
        raise _fail(f"no key {key_id!r}")
    _show("key caps", [view], ["id", "name", "prefix", "daily_cap_usd", "monthly_cap_usd"])


@keys_app.command("limits")
def keys_limits(key_id: str, max_concurrent: Limit = None, rpm: Limit = None, tpm: Limit = None,
                data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Change a key's limits. Shown after the change."""
    changes = _limit_changes(max_concurrent=max_concurrent, rpm=rpm, tpm=tpm)
    view = _run(data_dir, database_url, lambda a: a.keys.set_limits(key_id, changes))
    if view is None:
        raise _fail(f"no key {key_id!r}")
    _show("key limits", [view], ["id", "name", "prefix", "max_concurrent", "rpm", "tpm"])


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDir = None, database_url: DatabaseUrl = None) -> None:
    """Revoke a key: it stops working at once."""
    view = _run(data_dir, database_url, lambda a: a.keys.revoke(key_id))
    if view is None:
        raise _fail(f"no key {key_id!r}")
    _show("key revoked", [view], ["id", "name", "prefix", "revoked_at"])


# -- usage -------------------------------------------------------------------------------
def usage(
    account_id: Annotated[str | None, typer.Option(help="Only this account.")] = None,
    group_by: Annotated[str, typer.Option(help="key, model or day.")] = "day",
    start: Annotated[str | None, typer.Option("--from", help="Start (ISO date/datetime or unix seconds).")] = None,
    end: Annotated[str | None, typer.Option("--to", help="End, exclusive.")] = None,
    data_dir: DataDir = None,
    database_url: DatabaseUrl = None,
    as_json: JsonOutput = False,
) -> None:
    """Usage grouped by key, model or day: requests, tokens, cache hit ratio and cost."""
    if group_by not in GROUPINGS:
        raise _fail(f"--group-by must be one of {', '.join(GROUPINGS)}")
    begin = parse_instant(start) if start else None
    finish = parse_instant(end) if end else None
    rows = _run(data_dir, database_url, lambda a: a.ledger.report(account_id, begin, finish, group_by))
    if as_json:
        _print_json(rows)
        return
    _show(f"usage by {group_by}", rows, ["group", "requests", "prompt_tokens", "cached_tokens",
                                                        "completion_tokens", "reasoning_tokens", "cache_hit_ratio",
                                                        "cost_usd"])
