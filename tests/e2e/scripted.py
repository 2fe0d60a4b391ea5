"""A real `flashserve serve` in front of the scripted raw-V4 upstream, for the e2e tests of every surface.

The upstream (`tests/e2e/scripted_v4_upstream.py`) runs as its own process; flashserve's catalog points one
model at it with `raw_text = "deepseek_v4"`, so thinking, DSML calls and answers are parsed by flashserve
as they would be from a real V4, and an agent turn runs in seconds.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import REPO, _free_port, _python, _stop, _wait_ready, start_server


@dataclass
class Scripted:
    base: str  # flashserve
    upstream: str  # the scripted upstream
    admin_key: str

    def sent(self) -> list[dict[str, Any]]:
        """The request bodies the upstream received, in order."""
        return httpx.get(f"{self.upstream}/requests", timeout=10).json()

    def records(self) -> list[dict[str, Any]]:
        """flashserve's usage rows."""
        with httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.admin_key}"},
                          timeout=30) as admin:
            return admin.get("/admin/usage/records").json()["data"]


@contextmanager
def serve_scripted(factory: pytest.TempPathFactory, script: dict[str, Any], *, model: str, key: str,
                   admin_key: str, card: str = "context_length = 1048576\nreasoning = true") -> Iterator[Scripted]:
    """flashserve serving `model` from a scripted upstream playing `script`; `card` is the model's catalog
    lines above its backend table."""
    folder = factory.mktemp("scripted")
    script_file = folder / "script.json"
    script_file.write_text(json.dumps(script))
    upstream_url = f"http://127.0.0.1:{_free_port()}"
    upstream = subprocess.Popen([_python(), "tests/e2e/scripted_v4_upstream.py", "--port",
                                 upstream_url.rsplit(":", 1)[1], "--script", str(script_file)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    catalog = folder / "catalog.toml"
    catalog.write_text(f'''
[models."{model}"]
{card}

[models."{model}".backend]
type = "remote"
url = "{upstream_url}/v1"
model = "deepseek-v4-flash"
kind = "vllm"
raw_text = "deepseek_v4"
''')
    try:
        _wait_upstream(upstream_url)
        process, base, log = start_server(factory, {"FLASHSERVE_API_KEY": key, "FLASHSERVE_ADMIN_KEY": admin_key,
                                                    "FLASHSERVE_CATALOG": str(catalog)},
                                          unset=("FLASHSERVE_DATABASE_URL",))
        try:
            _wait_ready(base, process, log)
            yield Scripted(base, upstream_url, admin_key)
        finally:
            _stop(process, log)
    finally:
        upstream.kill()
        upstream.wait(timeout=10)


def _wait_upstream(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/health", timeout=2)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                pytest.fail("the scripted upstream did not start")
            time.sleep(0.2)
