"""`--workers N`: N local `flashserve serve` processes, each with its own engine, supervised here.

`WorkerPool.start` launches the processes on free 127.0.0.1 ports with an internal key (each with its own
data dir and unused ledger, no catalog), waits until every one answers /health (or fails fast when one
exits), and reads the context length they serve. `stop` terminates them (killing one that does not stop
within a minute). `server.py` puts a `backends/router.py: Router` in front of them, one replica each,
which keeps the API, the keys and the billing in the front process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from flashserve.accounts.keys import generate_key
from flashserve.settings import Settings


@dataclass
class WorkerPool:
    processes: list[subprocess.Popen[bytes]]
    urls: list[str]
    key: str
    context_length: int
    admin_key: str = ""  # each worker's admin key: the router scrapes their /metrics with it

    @classmethod
    def start(cls, settings: Settings, path: Path, timeout_s: float = 300.0) -> WorkerPool:
        key, admin_key = generate_key(), generate_key()
        processes, urls = [], []
        for i in range(settings.workers):
            port = _free_port()
            data = Path(settings.data_dir) / f"worker-{i}"
            data.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "FLASHSERVE_API_KEY": key, "FLASHSERVE_ADMIN_KEY": admin_key,
                   "FLASHSERVE_WORKERS": "0", "PYTHONUNBUFFERED": "1"}
            env.pop("FLASHSERVE_CATALOG", None)
            env.pop("FLASHSERVE_METRICS_BIND", None)  # the front serves every worker's series
            env.pop("FLASHSERVE_DATABASE_URL", None)  # each worker keeps its own (unused) ledger
            cmd = [sys.executable, "-m", "flashserve", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--data-dir", str(data)] + (["--model", str(path)] if settings.model else [])
            with open(data / "worker.log", "wb") as log_file:
                processes.append(subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))
            urls.append(f"http://127.0.0.1:{port}")
        pool = cls(processes, urls, key, 0, admin_key)
        deadline = time.monotonic() + timeout_s
        for process, url in zip(processes, urls, strict=True):
            while True:
                if process.poll() is not None:
                    pool.stop()
                    raise RuntimeError(f"engine worker {url} exited during start-up (see its worker.log)")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pool.stop()
                    raise RuntimeError(f"engine worker {url} not ready after {timeout_s:.0f}s")
                time.sleep(0.25)
        models = httpx.get(f"{urls[0]}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        pool.context_length = int(models["data"][0]["context_length"])
        return pool

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _die_with_parent() -> None:
    """In the worker, before it runs: on Linux, SIGTERM it when the front process dies, however it dies (a
    SIGKILL, or a SIGTERM while it still waits for the workers to start), so no worker outlives its router."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


