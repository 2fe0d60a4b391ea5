"""A throwaway `redis-server` for the tests of the shared rate limits (Debian's package; `.ci/run` installs
and starts one with scripts/test-redis.sh and sets FLASHSERVE_TEST_REDIS_URL).

`redis_url()` is that URL when set; otherwise, with `redis-server` on the PATH, a private server on a free
port, started once per test session (no persistence, stopped at exit). In CI a missing Redis is a
failure; locally, without one, the Redis tests skip.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

REDIS_ENV = "FLASHSERVE_TEST_REDIS_URL"
_started: list[str] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_private_redis() -> tuple[subprocess.Popen, str]:
    """A new `redis-server` on a free 127.0.0.1 port, ready to answer; the caller stops it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="flashserve-redis-")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"redis-server did not answer on port {port}")


def redis_url() -> str:
    url = os.environ.get(REDIS_ENV)
    if url:
        return url
    if _started:
        return _started[0]
    try:
        process, url = start_private_redis()
    except FileNotFoundError:
        if os.environ.get("CI"):
            pytest.fail(f"{REDIS_ENV} is not set and redis-server is missing: .ci/run must start Redis",
                        pytrace=False)
        pytest.skip("redis-server not installed (`apt-get install redis-server`); Redis tests not run")
    atexit.register(lambda: (process.terminate(), process.wait(10)))
    _started.append(url)
    return url
