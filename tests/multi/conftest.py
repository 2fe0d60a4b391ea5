"""The multi-gateway tier: several real `flashserve serve` processes sharing one PostgreSQL and one Redis,
as a provider runs them behind a load balancer. Run by `make test-multi` (`.ci/run` starts both servers
with scripts/test-postgres.sh and scripts/test-redis.sh); without them, locally, these tests skip.

Generic fixtures, for any test of this tier:
- `fresh_database`: a PostgreSQL database of its own for the module (created, dropped after).
- `launch_gateway(database_url, extra_env)`: start one more gateway on that database (the caller passes
  FLASHSERVE_REDIS_URL etc. in `extra_env`); it is stopped when the module ends. Gateways of one module
  share the API and admin keys below, so an account or key made through one works through all.
- `slow_upstream`: tests/multi/slow_upstream.py, which counts the requests running at once, per tag.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import postgres_url
from tests.e2e.conftest import REPO, _free_port, _log_tail, _python, _stop, _wait_ready, start_server
from tests.multi.ledger_gateways import anyio_backend, gateways, pg_database  # noqa: F401 - the ledger tests' fixtures

MULTI_DIR = Path(__file__).resolve().parent
API_KEY = "sk-flashserve-multi-0123456789abcdef"
ADMIN_KEY = "sk-flashserve-multi-admin-0123456789abcdef"
UPSTREAM_MODEL = "slow-upstream"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if MULTI_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.multi)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multi: several gateway processes on one PostgreSQL and one Redis")


@dataclass
class Gateway:
    base: str
    process: subprocess.Popen
    log_path: Path
    _clients: list[httpx.Client] = field(default_factory=list)

    def client(self, key: str = API_KEY, timeout: float = 60.0) -> httpx.Client:
        c = httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
        self._clients.append(c)
        return c

    def admin(self) -> httpx.Client:
        return self.client(ADMIN_KEY)

    def kill(self) -> None:
        """SIGKILL: no drain, no release, nothing more from this process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def log(self) -> str:
        return _log_tail(self.log_path, 60)


async def _create_database(base: str, name: str, drop: bool) -> None:
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            if drop:
                await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            else:
                await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()


@pytest.fixture(scope="module")
def fresh_database() -> Iterator[str]:
    base = postgres_url()
    name = f"flashserve_multi_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(base, name, drop=False))
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(_create_database(base, name, drop=True))


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([_python(), str(MULTI_DIR / "slow_upstream.py"), str(port)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the slow upstream did not start", pytrace=False)
            time.sleep(0.1)
        yield url
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def upstream_catalog(tmp_path_factory: pytest.TempPathFactory, slow_upstream: str) -> Path:
    catalog = tmp_path_factory.mktemp("multi-catalog") / "catalog.toml"
    catalog.write_text(f'''
[models."{UPSTREAM_MODEL}"]
context_length = 65536

[models."{UPSTREAM_MODEL}".backend]
type = "remote"
url = "{slow_upstream}/v1"
model = "slow"
kind = "openai"
retries = 0
timeout_s = 120
''')
    return catalog


@pytest.fixture(scope="module")
def launch_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Gateway]]:
    """Start a gateway on `database_url` with `extra_env`, wait until it answers; stopped at module end."""
    started: list[Gateway] = []

    def launch(database_url: str, extra_env: dict[str, str] | None = None) -> Gateway:
        env = {"FLASHSERVE_API_KEY": API_KEY, "FLASHSERVE_ADMIN_KEY": ADMIN_KEY,
               "FLASHSERVE_DATABASE_URL": database_url, "FLASHSERVE_KV_CACHE_TOKENS": "2048",
               **(extra_env or {})}
        process, base, log_path = start_server(tmp_path_factory, env, unset=("FLASHSERVE_DEFAULT_BALANCE_USD",))
        gateway = Gateway(base, process, log_path)
        started.append(gateway)
        _wait_ready(base, process, log_path)
        return gateway

    yield launch
    for gateway in started:
        for c in gateway._clients:
            c.close()
        _stop(gateway.process, gateway.log_path)


@pytest.fixture(scope="session", autouse=True)
def _no_inherited_server_env() -> None:
    """A developer's own FLASHSERVE_* settings must not leak into the gateways these tests start."""
    for name in ("FLASHSERVE_REDIS_URL", "FLASHSERVE_CATALOG", "FLASHSERVE_WORKERS"):
        os.environ.pop(name, None)
