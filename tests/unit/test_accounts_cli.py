"""`flashserve accounts|keys|usage` on a real SQLite file, run through the real typer app in-process: at 80
columns no id is ever cut (the too-wide listings print one block per row), and every listing and `usage` take
`--json`, which scripts parse. (A stopped server's database driven by the CLI is covered end to end in
tests/e2e/test_lifecycle.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flashserve.cli import app

ID = re.compile(r"\b(?:acct|key)_[0-9a-f]+")


@pytest.fixture
def flashserve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Runs `flashserve ARGS --data-dir TMP` at COLUMNS=80; returns its output (asserting exit 0)."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("FLASHSERVE_DATABASE_URL", raising=False)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, [*args, "--data-dir", str(tmp_path)])
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.output

    return run


def test_listings_at_80_columns_show_every_id_whole(flashserve) -> None:
    created = flashserve("accounts", "create", "a-rather-long-account-name-for-a-narrow-terminal", "--balance-usd", "3")
    [account_id] = set(ID.findall(created))
    keys = [re.search(r"sk-fs-\S+", flashserve("keys", "create", account_id, "--name", f"k{i}", "--rpm", "5"))
            for i in range(2)]
    assert all(keys)
    listed = json.loads(flashserve("keys", "list", "--json"))
    key_ids = {k["id"] for k in listed}
    assert len(key_ids) == 2

    for output in (flashserve("accounts", "show"), flashserve("accounts", "show", account_id),
                   flashserve("keys", "list"), flashserve("keys", "list", "--account-id", account_id)):
        assert "…" not in output and "..." not in output, output
        assert all(len(line) <= 80 for line in output.splitlines()), output
        shown = set(ID.findall(output))
        assert account_id in shown, output
        if "prefix" in output:
            assert key_ids <= shown, output
            assert "max_concurrent" in output and "revoked_at" in output  # no column dropped


def test_every_listing_and_usage_take_json(flashserve) -> None:
    account_id = ID.search(flashserve("accounts", "create", "json-account", "--balance-usd", "2.5"))[0]
    flashserve("keys", "create", account_id, "--name", "scripted", "--tpm", "1000")

    accounts = json.loads(flashserve("accounts", "show", "--json"))
    [mine] = [a for a in accounts if a["id"] == account_id]
    assert mine["name"] == "json-account" and mine["balance_pusd"] == 2_500_000_000_000
    assert json.loads(flashserve("accounts", "show", account_id, "--json")) == [mine]

    [key] = json.loads(flashserve("keys", "list", "--account-id", account_id, "--json"))
    assert key["name"] == "scripted" and key["tpm"] == 1000 and key["account_id"] == account_id
    assert "key" not in key and not any(str(v).startswith("sk-fs-") and len(str(v)) > 20 for v in key.values())

    for group_by in ("day", "key", "model"):
        assert json.loads(flashserve("usage", "--group-by", group_by, "--json")) == []  # no traffic yet
