"""`flashserve accounts limits` and `flashserve keys limits` on a real SQLite database: set, keep what is not
given, clear with 0, and name a missing account or key."""

from __future__ import annotations

import asyncio
from pathlib import Path

from typer.testing import CliRunner

from flashserve.accounts.keys import KeyLimits
from flashserve.accounts.service import Accounts
from flashserve.cli import app

ENV = {"COLUMNS": "250", "NO_COLOR": "1"}


def test_account_and_key_limits_from_the_cli(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'flashserve.db'}"

    async def setup() -> tuple[str, str, str]:
        async with Accounts(url) as accounts:
            account = await accounts.ledger.create_account("cli", 10**12)
            key, view = await accounts.keys.create(account["id"], "k", limits=KeyLimits(rpm=5))
            return account["id"], view["id"], key

    account, key_id, key = asyncio.run(setup())
    runner = CliRunner()
    db = ["--database-url", url]
    r = runner.invoke(app, ["accounts", "limits", account, "--max-concurrent", "3", "--user-rpm", "7", *db], env=ENV)
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["accounts", "limits", account, "--tpm", "1000", *db], env=ENV)
    assert r.exit_code == 0 and "1000" in r.output, r.output
    r = runner.invoke(app, ["keys", "limits", key_id, "--rpm", "0", "--max-concurrent", "2", *db], env=ENV)
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, ["accounts", "limits", "acct_nope", "--rpm", "1", *db], env=ENV).exit_code == 1
    assert runner.invoke(app, ["keys", "limits", "key_nope", "--rpm", "1", *db], env=ENV).exit_code == 1

    async def principal() -> object:
        async with Accounts(url) as accounts:
            return await accounts.keys.verify(key)

    p = asyncio.run(principal())
    assert p.limits == KeyLimits(max_concurrent=2)  # rpm 0: cleared
    assert p.account_limits == KeyLimits(max_concurrent=3, tpm=1000)  # the first call's limit kept
    assert p.user_limits == KeyLimits(rpm=7)
