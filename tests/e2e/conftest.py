"""End-to-end fixtures: ONE real `flashserve serve` process for the whole e2e session (`server`), and the
early start of every e2e server the selected tests use (`starts_early`, below).

The server is started exactly as a user would start it (`python -m flashserve serve` on a free
127.0.0.1 port, a temporary data dir, the API key in FLASHSERVE_API_KEY), and the tests drive it
over HTTP with the official `openai` client or raw `httpx`. Its stdout/stderr go to a log file
whose tail is attached to every failing e2e test report and printed when startup fails.

Every test under tests/e2e gets the `e2e` marker, so `pytest -m "not e2e"` runs the unit tests only.
The session server also gets a known admin key (ADMIN_KEY, for /admin/*) and its own SQLite ledger in
the data dir. Set FLASHSERVE_E2E_BASE_URL (and FLASHSERVE_E2E_API_KEY, FLASHSERVE_E2E_ADMIN_KEY) to run
the suite against a server that is already running instead of starting one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
API_KEY = "sk-flashserve-e2e-0123456789abcdef"
ADMIN_KEY = "sk-flashserve-e2e-admin-0123456789abcdef"
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 80

_server_log: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test against a real `flashserve serve` process")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.failed and _server_log is not None and E2E_DIR in Path(str(item.path)).resolve().parents:
        report.sections.append((f"flashserve server log (last {LOG_TAIL_LINES} lines)", _log_tail()))
    return report


def _log_tail(log_path: Path | None = None, lines: int = LOG_TAIL_LINES) -> str:
    log_path = log_path or _server_log
    if log_path is None or not log_path.exists():
        return "<no server log>"
    text = log_path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python() -> str:
    venv_python = REPO / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


@dataclass(frozen=True)
class Server:
    base_url: str
    api_key: str
    process: subprocess.Popen | None
    log_path: Path | None
    admin_key: str | None = None


def _wait_ready(base_url: str, process: subprocess.Popen | None, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"flashserve exited with code {process.returncode} during startup; log:\n{_log_tail(log_path)}",
                        pytrace=False)
        try:
            r = httpx.get(f"{base_url}/health", timeout=5.0)
            if r.status_code == 200:
                return
            last_error = f"GET /health -> {r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last_error = repr(e)
        time.sleep(0.25)
    pytest.fail(f"flashserve not ready after {STARTUP_TIMEOUT_S:.0f}s (last: {last_error}); "
                f"log:\n{_log_tail(log_path)}", pytrace=False)


# -- servers started early ----------------------------------------------------------------------------------------
# Starting a server is mostly one core importing and loading weights; the in-process tiers (tests/api) mostly
# leave the machine's other core idle. So once collection shows which servers the selected e2e tests use, they are
# all started at once, in a background thread each, and their fixtures only wait for them (and stop them at the
# end). A fixture registers its starter with `@starts_early("fixture name")` and takes what it started with
# `started_early("fixture name", factory)`; a starter returns a `(process, base_url, log)` triple or an object
# with a `stop()`.
_starters: dict[str, Callable[[pytest.TempPathFactory], Any]] = {}
_prestarted: dict[str, Future] = {}


def starts_early(fixture: str) -> Callable[[Callable[[pytest.TempPathFactory], Any]], Callable[..., Any]]:
    def register(starter: Callable[[pytest.TempPathFactory], Any]) -> Callable[..., Any]:
        _starters[fixture] = starter
        return starter
    return register


def started_early(fixture: str, factory: pytest.TempPathFactory) -> Any:
    """What was started early for `fixture`, or (run without it being known at collection) started now."""
    future = _prestarted.pop(fixture, None)
    return future.result() if future is not None else _starters[fixture](factory)


@starts_early("server")
def _start_session_server(factory: pytest.TempPathFactory) -> tuple[subprocess.Popen, str, Path]:
    # A fresh SQLite ledger in the data dir and the default starting balance, whatever the caller's env says.
    return start_server(factory, {"FLASHSERVE_API_KEY": API_KEY, "FLASHSERVE_ADMIN_KEY": ADMIN_KEY},
                        unset=("FLASHSERVE_DATABASE_URL", "FLASHSERVE_DEFAULT_BALANCE_USD"))


@starts_early("upstreams")
def _start_upstreams(factory: pytest.TempPathFactory) -> Any:
    from tests.e2e.scripted import UpstreamsProcesses  # scripted.py imports this module

    return UpstreamsProcesses(factory)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or os.environ.get("FLASHSERVE_E2E_BASE_URL"):
        return
    used: set[str] = set()
    for item in session.items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            used.update(getattr(item, "fixturenames", ()))
    factory: pytest.TempPathFactory = session.config._tmp_path_factory  # type: ignore[attr-defined]
    wanted = [name for name in _starters if name in used]
    if wanted:
        factory.getbasetemp()  # made here, once: threads making it at the same time race (pytest-N and N+1)
        pool = ThreadPoolExecutor(max_workers=len(wanted), thread_name_prefix="e2e-start")
        for name in wanted:
            _prestarted[name] = pool.submit(_starters[name], factory)
        pool.shutdown(wait=False)


def _stop_started(started: Any) -> None:
    if isinstance(started, tuple):
        _stop(started[0], started[2])
    elif started is not None:
        started.stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stops what was started early but never used (a run stopped by -x, say)."""
    for future in _prestarted.values():
        try:
            _stop_started(future.result())
        except BaseException as exc:  # noqa: BLE001 - never fail the session's end over a server nobody used
            print(f"stopping an unused e2e server: {exc!r}")
    _prestarted.clear()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    global _server_log
    external = os.environ.get("FLASHSERVE_E2E_BASE_URL")
    if external:
        base = external.rstrip("/")
        _wait_ready(base, None)
        yield Server(base, os.environ.get("FLASHSERVE_E2E_API_KEY", API_KEY), None, None,
                     os.environ.get("FLASHSERVE_E2E_ADMIN_KEY") or None)
        return

    process, base, _server_log = started_early("server", tmp_path_factory)
    try:
        _wait_ready(base, process, _server_log)
        yield Server(base, API_KEY, process, _server_log, ADMIN_KEY)
    finally:
        _stop(process, _server_log)


def start_server(tmp_path_factory: pytest.TempPathFactory, env_overrides: dict[str, str],
                 unset: tuple[str, ...] = (), data_dir: Path | None = None) -> tuple[subprocess.Popen, str, Path]:
    """Start `flashserve serve` on a free port; returns the process, its base URL and its log file.

    The data dir is a fresh `<workdir>/data` unless `data_dir` names one (to restart on the same state)."""
    workdir = tmp_path_factory.mktemp("flashserve-e2e")
    if data_dir is None:
        data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [_python(), "-m", "flashserve", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir)]
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update({"PYTHONUNBUFFERED": "1", **env_overrides})
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    return process, base, log_path


def _stop(process: subprocess.Popen, log_path: Path | None = None) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        pytest.fail(f"flashserve did not exit within {STOP_TIMEOUT_S:.0f}s of SIGTERM; log:\n{_log_tail(log_path)}",
                    pytrace=False)


@pytest.fixture(scope="session")
def base_url(server: Server) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def api_key(server: Server) -> str:
    return server.api_key


@pytest.fixture(scope="session")
def client(base_url: str, api_key: str) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120.0)
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(base_url: str, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                      timeout=120.0) as c:
        yield c


@pytest.fixture(scope="session")
def admin(server: Server) -> Iterator[httpx.Client]:
    """Raw httpx client carrying the admin key, for /admin/*."""
    if server.admin_key is None:
        pytest.skip("set FLASHSERVE_E2E_ADMIN_KEY to run the admin tests against an external server")
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {server.admin_key}"},
                      timeout=120.0) as c:
        yield c


@pytest.fixture(scope="session")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The session's one server in front of scripted upstreams (tests/e2e/scripted.py: `serve_upstreams`),
    shared by the Anthropic, Responses, raw-V4 and remote-backend tests and the terminal chat."""
    from tests.e2e.scripted import serve_upstreams  # scripted.py imports this module

    with serve_upstreams(tmp_path_factory, started_early("upstreams", tmp_path_factory)) as served:
        yield served
