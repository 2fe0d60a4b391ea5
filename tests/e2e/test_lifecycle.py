"""One server's life on one data dir, in order: SIGKILL under load, the CLI on the stopped database, a restart
that generates its keys, and a SIGTERM that drains. Two server starts cover what took four.

1. SIGKILL under load leaves a consistent ledger (was test_ledger_integrity.py): 20 requests of 6 to 186
   tokens, half streamed; the server is killed once a few have finished. While it is down, the CLI tops up,
   creates a key and an account on the same database.
2. The restart on the same data dir, without FLASHSERVE_API_KEY / FLASHSERVE_ADMIN_KEY, with a 256-token
   context and another default balance: the banner prints the generated keys and the base URL (was
   test_small_context.py), the generated key works and others do not; the default account keeps its balance;
   every row is complete, the answers that finished before the kill have theirs, balance = 3 + 2 + 1 (CLI) -
   the rows' costs; and it goes on serving and charging, also with the CLI's key.
3. SIGTERM during a stream on that server (was test_overload_and_shutdown.py): new requests get 503
   `shutting_down` at once and /health says draining, the stream in flight finishes (finish_reason length,
   `[DONE]`), its usage row is in the ledger, and the process exits 0.

Tests 2 and 3 use the server test 1 restarted; run alone (`-k`), or after test 1 failed, they start that
server themselves on a fresh data dir (the `restarted` fixture). What moved in-process (tests/api): the full
queue's 503 `overloaded` and keep-alive, the drain time running out, the /admin/engine report, a non-streaming
client that leaves (test_billing.py, test_drain.py); the context limits (test_context.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from flashserve.cli import app
from tests.e2e.conftest import REPO, _log_tail, _python, _stop, _wait_ready, start_server, started_early, starts_early
from tests.e2e.test_accounts_api import (
    MODEL,
    PUSD_PER_USD,
    check_cost_header,
    check_record,
    records,
    wait_records,
)

API_KEY = "sk-flashserve-ledger-0123456789abcdef"
ADMIN_KEY = "sk-flashserve-ledger-admin-0123456789abcdef"
N_KILL = 20
CONTEXT = 256  # the restarted server's context
NO_EOS = {"2": -100, "0": -100}  # SmolLM2's end-of-turn tokens: the model cannot stop before max_tokens
UNSET = ("FLASHSERVE_DATABASE_URL", "FLASHSERVE_API_KEY", "FLASHSERVE_ADMIN_KEY")


def _chat_body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Reply with the number {i}."}],
            "temperature": 0, "max_tokens": max_tokens}


# -- the restarted server, handed from test 1 to the others ------------------------------------------------------
@dataclass
class Restarted:
    process: subprocess.Popen
    base: str
    log: Path
    data_dir: Path
    api_key: str  # generated, from the banner
    admin_key: str  # generated, from the banner
    banner: str

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=60)


@dataclass
class _Handoff:
    server: Restarted | None = None
    started: list[Restarted] = field(default_factory=list)


_handoff = _Handoff()


def restart(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Restarted:
    """`flashserve serve` on `data_dir` with generated keys, a 256-token context, a default balance of $7 and
    300 s for a SIGTERM's drain (test 3's stream needs a few seconds; a loaded machine far more)."""
    env = {"FLASHSERVE_DEFAULT_BALANCE_USD": "7", "FLASHSERVE_MAX_CONTEXT_TOKENS": str(CONTEXT),
           "FLASHSERVE_SHUTDOWN_DRAIN_S": "300"}
    process, base, log = start_server(tmp_path_factory, env, UNSET, data_dir=data_dir)
    try:
        _wait_ready(base, process, log)
        banner = log.read_text(errors="replace")
        key = re.search(r"API key:\s+(\S+)\s+\(generated for this run", banner)
        admin = re.search(r"admin key:\s+(sk-fs-\S+)\s+\(generated for this run", banner)
        assert key and admin, f"the banner names no generated keys:\n{banner}"
    except BaseException:
        _stop(process, log)
        raise
    server = Restarted(process, base, log, data_dir, key.group(1), admin.group(1), banner)
    _handoff.started.append(server)
    return server


@pytest.fixture(scope="module", autouse=True)
def _stop_the_restarted() -> Iterator[None]:
    """Whichever tests ran, every server `restart` started is stopped with the module."""
    yield
    for started in _handoff.started:
        if started.process.poll() is None:
            _stop(started.process, started.log)


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> Restarted:
    """The server test 1 restarted, or (test 1 not run or failed before the restart) a fresh one like it."""
    return _handoff.server or restart(tmp_path_factory, tmp_path_factory.mktemp("lifecycle") / "data")


# -- 1. SIGKILL under load ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    ok: bool = False
    finished_at: float | None = None
    error: str | None = None


def _load_request(base: str, i: int, start: threading.Barrier, out: Outcome) -> None:
    # From 6 to 186 tokens: the short ones finish before the kill, the long ones are cut by it.
    body = _chat_body(i, 6 + (i % 10) * 20) | {"logit_bias": NO_EOS}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    start.wait(timeout=60)
    try:
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
                lines = list(r.iter_lines())
                ok = r.status_code == 200 and "data: [DONE]" in lines
        else:
            r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120)
            ok = r.status_code == 200
        out.ok, out.finished_at = ok, time.monotonic()
    except httpx.HTTPError as e:  # the server was killed under this request
        out.error = repr(e)


def cli(data_dir: Path, *args: str) -> str:
    """Runs `flashserve ARGS --data-dir DATA_DIR` as a process on the database of a stopped server; returns its
    output."""
    env = {k: v for k, v in os.environ.items() if k != "FLASHSERVE_DATABASE_URL"} | {"COLUMNS": "200"}
    cmd = [_python(), "-m", "flashserve", *args, "--data-dir", str(data_dir)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"$ {' '.join(cmd)} -> {done.returncode}\n{output}"
    return output


def cli_in_process(data_dir: Path, *args: str) -> str:
    """The same command through the same typer app in this process (no interpreter start-up: the CLI's own
    tests are tests/unit/test_accounts_cli.py); the database is still the stopped server's file."""
    result = CliRunner().invoke(app, [*args, "--data-dir", str(data_dir)],
                                env={"COLUMNS": "200", "FLASHSERVE_DATABASE_URL": None})
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def _default_account(admin: httpx.Client) -> dict:
    r = admin.get("/admin/accounts")
    assert r.status_code == 200, r.text
    [default] = [a for a in r.json()["data"] if a["name"] == "default"]
    return default


@starts_early("first_life")
def start_first_life(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.Popen, str, Path, Path]:
    """Test 1's server on a fresh data dir (started early: tests/e2e/conftest.py); returns the process, base URL,
    log and data dir."""
    data_dir = tmp_path_factory.mktemp("ledger-sigkill") / "data"
    env = {"FLASHSERVE_API_KEY": API_KEY, "FLASHSERVE_ADMIN_KEY": ADMIN_KEY, "FLASHSERVE_DEFAULT_BALANCE_USD": "3"}
    return (*start_server(tmp_path_factory, env, ("FLASHSERVE_DATABASE_URL",), data_dir=data_dir), data_dir)


@pytest.fixture
def first_life(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, str, Path, Path]]:
    started = started_early("first_life", tmp_path_factory)
    try:
        yield started
    finally:
        if started[0].poll() is None:
            _stop(started[0], started[2])


def test_sigkill_under_load_then_a_restart_leaves_a_consistent_ledger(
        tmp_path_factory: pytest.TempPathFactory, first_life: tuple[subprocess.Popen, str, Path, Path]) -> None:
    process, base, log, data_dir = first_life
    outcomes = [Outcome() for _ in range(N_KILL)]
    try:
        _wait_ready(base, process, log)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as admin:
            default = _default_account(admin)
            assert default["balance_pusd"] == 3 * PUSD_PER_USD, default
            r = admin.post(f"/admin/accounts/{default['id']}/top-up", json={"amount_usd": "2"})
            assert r.status_code == 200 and r.json()["balance_pusd"] == 5 * PUSD_PER_USD, r.text

        start = threading.Barrier(N_KILL + 1)
        threads = [threading.Thread(target=_load_request, args=(base, i, start, out), daemon=True)
                   for i, out in enumerate(outcomes)]
        for t in threads:
            t.start()
        start.wait(timeout=60)
        deadline = time.monotonic() + 90
        while sum(o.ok for o in outcomes) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        done_before = sum(o.ok for o in outcomes)
        time.sleep(0.3)
        killed_at = time.monotonic()
        process.kill()  # SIGKILL: no shutdown hook runs
        process.wait(timeout=30)
        for t in threads:
            t.join(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert done_before >= 3, f"no request finished under load; log:\n{_log_tail(log)}"
    assert any(o.error or not o.ok for o in outcomes), "the kill came after all the requests had finished"
    settled = sum(1 for o in outcomes if o.ok and o.finished_at is not None and o.finished_at < killed_at - 0.25)

    # While it is down, the CLI works on the same database: a top-up, a new key, a new account.
    # One command as its own process (`flashserve keys create`), the rest in-process on the same file.
    default_id = default["id"]
    created = cli(data_dir, "keys", "create", default_id, "--name", "cli-key", "--rpm", "100")
    match = re.search(r"sk-fs-[A-Za-z0-9_\-]{20,}", created)
    assert match, f"`keys create` printed no key:\n{created}"
    cli_key = match.group(0)
    cli_in_process(data_dir, "accounts", "top-up", default_id, "1")
    assert cli_key not in cli_in_process(data_dir, "keys", "list", "--account-id", default_id)
    cli_account = f"cli-{uuid.uuid4().hex[:8]}"
    cli_in_process(data_dir, "accounts", "create", cli_account, "--balance-usd", "2.5")
    assert cli_account in cli_in_process(data_dir, "accounts", "show")
    by_model = json.loads(cli_in_process(data_dir, "usage", "--group-by", "model", "--account-id", default_id,
                                         "--json"))

    # A restart on the same data dir, with another default balance: the existing default account keeps its own.
    server = restart(tmp_path_factory, data_dir)
    with server.admin() as admin:
        default = _default_account(admin)
        assert default["id"] == default_id
        [created_by_cli] = [a for a in admin.get("/admin/accounts").json()["data"] if a["name"] == cli_account]
        assert created_by_cli["balance_pusd"] == 2_500_000_000_000
        keys = admin.get("/admin/keys", params={"account_id": default_id}).json()["data"]
        assert any(k["name"] == "cli-key" and k["rpm"] == 100 for k in keys), keys
        rows = records(admin, default["id"])
        for row in rows:
            check_record(row)
        assert len(rows) <= N_KILL and len({row["request_id"] for row in rows}) == len(rows)
        ok_rows = [row for row in rows if row["status"] == "ok"]
        assert len(ok_rows) >= settled, f"{settled} answers finished before the kill, only {len(ok_rows)} rows"
        charged = sum(row["cost_pusd"] for row in rows)
        assert default["balance_pusd"] == 6 * PUSD_PER_USD - charged, (default, rows)  # 3 + 2 + 1 (CLI)
        # what the CLI's `usage --json` read on the stopped database is what the server reads back, but for
        # the requests in flight at the kill: the restart settles their reservations as `reaped` rows
        before_restart = [row for row in rows if row["status"] != "reaped"]
        assert sum(g["requests"] for g in by_model) == len(before_restart), (by_model, rows)
        assert sum(g["cost_pusd"] for g in by_model) == sum(row["cost_pusd"] for row in before_restart)

        # and it goes on serving and charging, also with the key the CLI made
        r = httpx.post(f"{server.base}/v1/chat/completions", json=_chat_body(0, 1),
                       headers={"Authorization": f"Bearer {cli_key}"}, timeout=120)
        cost = check_cost_header(r)
        after = wait_records(admin, default["id"], len(rows) + 1)
        [new] = [row for row in after if row["request_id"] == r.json()["id"]]
        assert new["key_id"] == next(k["id"] for k in keys if k["name"] == "cli-key")
        assert _default_account(admin)["balance_pusd"] == 6 * PUSD_PER_USD - charged - cost
    _handoff.server = server  # tests 2 and 3 go on with it


# -- 2. the banner's generated keys ------------------------------------------------------------------------------
def test_generated_keys_are_in_the_banner_and_work(restarted: Restarted) -> None:
    banner = restarted.banner
    assert f"{restarted.base}/v1" in banner, "the banner names the base URL"
    assert "deepseek/deepseek-v4-flash" in banner and "SmolLM2-135M-Instruct" in banner
    assert len(restarted.api_key) >= 32 and len(restarted.admin_key) >= 32
    assert restarted.api_key not in (API_KEY, restarted.admin_key)
    with openai.OpenAI(base_url=f"{restarted.base}/v1", api_key=restarted.api_key, max_retries=0) as client:
        card = client.models.retrieve(MODEL)
        assert card.id == MODEL and card.context_length == CONTEXT  # type: ignore[attr-defined]
    with openai.OpenAI(base_url=f"{restarted.base}/v1", api_key=restarted.api_key + "x", max_retries=0) as wrong, \
            pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with restarted.admin() as admin:
        assert admin.get("/admin/accounts").status_code == 200


# -- 3. SIGTERM drains -------------------------------------------------------------------------------------------
class Stream(threading.Thread):
    """A streaming request read line by line in the background."""

    def __init__(self, base: str, key: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.key, self.max_tokens = base, key, max_tokens
        self.lines: list[str] = []
        self.status: int | None = None
        self.first_token = threading.Event()

    def run(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 0,
                "max_tokens": self.max_tokens, "logit_bias": NO_EOS, "stream": True}
        with httpx.stream("POST", f"{self.base}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {self.key}"}, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if not line:
                    continue  # the blank line that ends each event
                self.lines.append(line)
                if '"content":' in line and '"content":""' not in line.replace(" ", ""):
                    self.first_token.set()

    def events(self) -> list[dict]:
        return [json.loads(x[6:]) for x in self.lines if x.startswith("data: {")]


def test_sigterm_drains_in_flight_work_then_exits_0(restarted: Restarted) -> None:
    process, base, headers = restarted.process, restarted.base, {"Authorization": f"Bearer {restarted.api_key}"}
    stream = Stream(base, restarted.api_key, 120)
    stream.start()
    assert stream.first_token.wait(60), stream.lines
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    r = httpx.post(f"{base}/v1/chat/completions", json=_chat_body(0, 2), headers=headers, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "draining"
    stream.join(120)
    assert process.wait(timeout=60) == 0, restarted.log.read_text(errors="replace")[-3000:]

    assert stream.status == 200 and stream.lines[-1] == "data: [DONE]"
    events = stream.events()
    assert "choices" in events[-1] and events[-1]["choices"][0]["finish_reason"] == "length", events[-1]
    with sqlite3.connect(restarted.data_dir / "flashserve.db") as db:
        rows = db.execute("SELECT status, completion_tokens, cost_pusd FROM usage_records WHERE request_id = ?",
                          (events[0]["id"],)).fetchall()
    [(status, completion, cost)] = rows
    assert status == "ok" and completion == 120 and cost > 0
