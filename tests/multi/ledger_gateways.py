"""Fixtures of the ledger tests of the multi-process tier (conftest.py imports them): several
`flashserve serve` gateway processes sharing one database (and, for the
limit tests, one Redis), as a provider runs them behind a load balancer. Run by `make test-multi` (not by
the default `pytest` run: tests/conftest.py leaves this folder out unless FLASHSERVE_TEST_MULTI=1).

Generic fixtures, for any test here:
- `pg_database`: a fresh, empty PostgreSQL database on the test server (FLASHSERVE_TEST_DATABASE_URL),
  dropped afterwards; its URL. Ask for it before `gateways` (`def test(pg_database, gateways)`), so the
  gateways stop before their database is dropped.
- `gateways`: a launcher, `gateways.start(database_url, env={...}, name=...)`, for a gateway on a free port
  with the embedded model, its own data dir and log, the shared API and admin keys; `Gateway.kill()`
  SIGKILLs one, and every gateway left is stopped (SIGTERM) at the end. Extra settings go in `env`
  (e.g. FLASHSERVE_REDIS_URL, FLASHSERVE_RESERVATION_LEASE_S).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import postgres_url
from tests.e2e.conftest import REPO, _free_port, _python

API_KEY = "sk-flashserve-multi-0123456789abcdef"
ADMIN_KEY = "sk-flashserve-multi-admin-0123456789abcdef"
STARTUP_TIMEOUT_S = 600.0  # model loading on a loaded CI machine can take minutes
LOG_TAIL_LINES = 60


@dataclass
class Gateway:
    name: str
    process: subprocess.Popen
    base_url: str
    data_dir: Path
    log_path: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(text[-lines:])

    def client(self, key: str = API_KEY, timeout: float = 300.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=timeout)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing is settled by this process."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class Gateways:
    root: Path
    started: list[Gateway] = field(default_factory=list)

    def start(self, database_url: str, env: dict[str, str] | None = None, name: str | None = None,
              wait: bool = True) -> Gateway:
        """A gateway on `database_url`, with the embedded model and `env` on top of the shared keys."""
        name = name or f"gw{len(self.started)}"
        workdir = self.root / f"{name}-{uuid.uuid4().hex[:6]}"
        data_dir = workdir / "data"
        data_dir.mkdir(parents=True)
        port = _free_port()
        cmd = [_python(), "-m", "flashserve", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data_dir)]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSERVE_") or k.startswith(
            ("FLASHSERVE_TEST_", "FLASHSERVE_NATIVE"))}
        full_env.update({"PYTHONUNBUFFERED": "1", "FLASHSERVE_API_KEY": API_KEY, "FLASHSERVE_ADMIN_KEY": ADMIN_KEY,
                         "FLASHSERVE_DATABASE_URL": database_url, "FLASHSERVE_DEFAULT_BALANCE_USD": "0",
                         **(env or {})})
        log_path = workdir / "server.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        gateway = Gateway(name, process, f"http://127.0.0.1:{port}", data_dir, log_path)
        self.started.append(gateway)
        if wait:
            self.wait_ready(gateway)
        return gateway

    def wait_ready(self, gateway: Gateway) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if gateway.process.poll() is not None:
                pytest.fail(f"{gateway.name} exited with {gateway.process.returncode} during start-up\n"
                            f"{gateway.log_tail()}", pytrace=False)
            try:
                if httpx.get(f"{gateway.base_url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        pytest.fail(f"{gateway.name} not ready after {STARTUP_TIMEOUT_S:.0f}s\n{gateway.log_tail()}", pytrace=False)

    def logs(self) -> str:
        return "\n".join(g.log_tail() for g in self.started)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Gateways]:
    launcher = Gateways(tmp_path)
    try:
        yield launcher
    finally:
        for gateway in launcher.started:
            gateway.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def create_database(base_url: str) -> str:
    name = f"flashserve_multi_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(base_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    await admin.dispose()
    return base_url.rsplit("/", 1)[0] + "/" + name


async def drop_database(base_url: str, url: str) -> None:
    admin = create_async_engine(base_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    await admin.dispose()


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (gateways migrate it themselves)."""
    base = postgres_url()
    url = asyncio.run(create_database(base))
    try:
        yield url
    finally:
        asyncio.run(drop_database(base, url))
