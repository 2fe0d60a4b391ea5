"""Real `flashserve serve` processes in front of scripted upstreams, for the e2e tests of every surface.

The upstreams run as their own processes: the scripted raw-V4 stand-in (`tests/e2e/scripted_v4_upstream.py`,
`raw_text = "deepseek_v4"` in the catalog, so thinking, DSML calls and answers are parsed by flashserve as
they would be from a real V4, and an agent turn runs in seconds) and the DeepSeek API stand-in
(`tests/e2e/fake_deepseek.py`).

`serve_upstreams` is the session's ONE such server (the `upstreams` fixture of tests/e2e/conftest.py): its
catalog serves
- `deepseek/deepseek-v4-flash` from the agents' script (AGENT_SCRIPT): the Anthropic and Responses clients,
  the Node SDK, Claude Code and Codex (test_anthropic_clients.py, test_responses_clients.py);
- `v4-raw` from RAW_SCRIPT with an output cap (test_raw_v4_upstream.py);
- `ds-remote` from the DeepSeek stand-in, with the reference prices, and `llama-remote` from the llama.cpp
  stand-in (`tests/e2e/fake_llamacpp.py`) (test_remote_backend.py, which reads the server's JSON log);
- and the embedded model under its own id, for Claude Code's context overflow.
Each test module talks to its own model and upstream, so they stay independent; one process instead of five
saves four server starts. `serve_scripted` still starts a dedicated server for one scripted model.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import REPO, _free_port, _python, _stop, _wait_ready, start_server

# -- the shared server's models, keys and scripts ---------------------------------------------------------------
KEY = "sk-fs-upstreams-e2e-0123456789"
ADMIN = "sk-fs-upstreams-e2e-admin-0123456789"
AGENT_MODEL = "deepseek/deepseek-v4-flash"  # what every claude-* name maps to by default, and Codex's model
RAW_MODEL = "v4-raw"
REMOTE_MODEL = "ds-remote"
LLAMA_MODEL = "llama-remote"
UPSTREAM_MODELS = (AGENT_MODEL, RAW_MODEL, REMOTE_MODEL, LLAMA_MODEL)  # every model but the embedded one
UPSTREAM_KEY = "upstream-secret-42"  # the DeepSeek stand-in's own key (flashserve reads it from the env)
AGENT_ANSWER = "Done: the command printed ok."
# Claude Code calls `Bash`, Codex and the Agents SDK `exec_command`: whichever the request offers.
AGENT_SCRIPT = {"chunk_chars": 5,
                "user": {"reasoning": "I will run the command.", "content": "",
                         "calls": {"Bash": {"command": "echo ok"}, "exec_command": {"cmd": "echo ok"}}},
                "tool": {"reasoning": "It printed ok.", "content": AGENT_ANSWER},
                "no_tools": {"reasoning": "Easy.", "content": "Hello!"}}
RAW_SCRIPT = {"chunk_chars": 3,
              "user": {"reasoning": "I should list the files.", "content": "",
                       "arguments": {"command": "ls -la", "timeout": 5}},
              "tool": {"reasoning": "Two files.", "content": "There are two files."},
              "no_tools": {"reasoning": "Easy.", "content": "Hello!"}}
DEFAULT_CARD = "context_length = 1048576\nreasoning = true"
RAW_CARD = "context_length = 131072\nreasoning = true\nmax_output_tokens_cap = 50"


@dataclass
class Scripted:
    base: str  # flashserve
    upstream: str  # the upstream of the model under test
    admin_key: str

    def sent(self) -> list[dict[str, Any]]:
        """The request bodies the upstream received, in order."""
        return httpx.get(f"{self.upstream}/requests", timeout=10).json()

    def records(self) -> list[dict[str, Any]]:
        """flashserve's usage rows, newest first."""
        with httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.admin_key}"},
                          timeout=30) as admin:
            return admin.get("/admin/usage/records", params={"limit": 10_000}).json()["data"]


@dataclass
class Upstreams:
    """The shared server: flashserve's base URL and keys, and each model's upstream."""

    base: str
    key: str
    admin_key: str
    upstream: dict[str, str]  # model id -> its upstream's base URL
    log: Path  # flashserve's log (JSON lines: FLASHSERVE_LOG_FORMAT=json)

    def scripted(self, model: str) -> Scripted:
        return Scripted(self.base, self.upstream[model], self.admin_key)


# -- upstream processes ---------------------------------------------------------------------------------------
@contextmanager
def scripted_upstream(folder: Path, script: dict[str, Any]) -> Iterator[str]:
    """The scripted raw-V4 upstream playing `script`; yields its base URL."""
    script_file = folder / f"script-{_free_port()}.json"
    script_file.write_text(json.dumps(script))
    url = f"http://127.0.0.1:{_free_port()}"
    process = subprocess.Popen([_python(), "tests/e2e/scripted_v4_upstream.py", "--port", url.rsplit(":", 1)[1],
                                "--script", str(script_file)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield url
    finally:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def deepseek_stand_in(key: str) -> Iterator[str]:
    """The DeepSeek API stand-in demanding `key`; yields its base URL."""
    with stand_in("tests.e2e.fake_deepseek", key) as url:
        yield url


@contextmanager
def stand_in(module: str, *args: str) -> Iterator[str]:
    """The stand-in upstream `python -m MODULE PORT ARGS...` (it serves `GET /requests`); yields its base URL."""
    url = f"http://127.0.0.1:{_free_port()}"
    process = subprocess.Popen([_python(), "-m", module, url.rsplit(":", 1)[1], *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield url
    finally:
        process.kill()  # it may still sit on a stalled request: no graceful exit needed
        process.wait(timeout=10)


def _wait_upstream(url: str, path: str = "/health") -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}{path}", timeout=2)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                pytest.fail(f"the upstream at {url} did not start")
            time.sleep(0.1)


def raw_v4_entry(model: str, url: str, card: str) -> str:
    """A catalog entry serving `model` from a scripted raw-V4 upstream at `url`."""
    return f'''
[models."{model}"]
{card}

[models."{model}".backend]
type = "remote"
url = "{url}/v1"
model = "deepseek-v4-flash"
kind = "vllm"
raw_text = "deepseek_v4"
'''


def deepseek_entry(model: str, url: str, key_env: str) -> str:
    """A catalog entry serving `model` from the DeepSeek stand-in at `url`, at the reference prices."""
    return f'''
[models."{model}"]
context_length = 131072
reasoning = true

[models."{model}".prices]
input_cache_hit = "0.0028"
input_cache_miss = "0.14"
output = "0.28"

[models."{model}".backend]
type = "remote"
url = "{url}/v1"
model = "deepseek-v4-flash"
kind = "deepseek"
api_key_env = "{key_env}"
retries = 2
timeout_s = 2
'''


def llamacpp_entry(model: str, url: str) -> str:
    """A catalog entry serving `model` from the llama.cpp stand-in at `url`, without retries."""
    return f'''
[models."{model}".backend]
type = "remote"
url = "{url}/v1"
model = "smollm2"
kind = "llamacpp"
retries = 0
'''


# -- servers --------------------------------------------------------------------------------------------------
class UpstreamsProcesses:
    """The shared server's processes, started at once (nothing waits for anything): the four upstreams and
    flashserve, whose catalog only names the upstreams' ports. `ready()` waits for all five; `stop()` ends them.
    Split so that tests/e2e/conftest.py can start them early and the fixture wait later."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        folder = factory.mktemp("upstreams")
        self.stack = ExitStack()
        try:
            self.agent = self.stack.enter_context(scripted_upstream(folder, AGENT_SCRIPT))
            self.raw = self.stack.enter_context(scripted_upstream(folder, RAW_SCRIPT))
            self.deepseek = self.stack.enter_context(deepseek_stand_in(UPSTREAM_KEY))
            self.llamacpp = self.stack.enter_context(stand_in("tests.e2e.fake_llamacpp"))
            catalog = folder / "catalog.toml"
            catalog.write_text(raw_v4_entry(AGENT_MODEL, self.agent, DEFAULT_CARD)
                               + raw_v4_entry(RAW_MODEL, self.raw, RAW_CARD)
                               + deepseek_entry(REMOTE_MODEL, self.deepseek, "FLASHSERVE_TEST_UPSTREAM_KEY")
                               + llamacpp_entry(LLAMA_MODEL, self.llamacpp))
            self.process, self.base, self.log = start_server(
                factory, {"FLASHSERVE_API_KEY": KEY, "FLASHSERVE_ADMIN_KEY": ADMIN, "FLASHSERVE_CATALOG": str(catalog),
                          "FLASHSERVE_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "FLASHSERVE_LOG_FORMAT": "json"},
                unset=("FLASHSERVE_DATABASE_URL",))
        except BaseException:
            self.stack.close()
            raise

    def ready(self) -> Upstreams:
        for url in (self.agent, self.raw):
            _wait_upstream(url)
        for url in (self.deepseek, self.llamacpp):
            _wait_upstream(url, "/requests")
        _wait_ready(self.base, self.process, self.log)
        return Upstreams(self.base, KEY, ADMIN, {AGENT_MODEL: self.agent, RAW_MODEL: self.raw,
                                                REMOTE_MODEL: self.deepseek, LLAMA_MODEL: self.llamacpp}, self.log)

    def stop(self) -> None:
        try:
            _stop(self.process, self.log)
        finally:
            self.stack.close()


@contextmanager
def serve_upstreams(factory: pytest.TempPathFactory, started: UpstreamsProcesses | None = None) -> Iterator[Upstreams]:
    """The shared server (see the module docstring); `started`: its processes, if they were started already."""
    processes = started or UpstreamsProcesses(factory)
    try:
        yield processes.ready()
    finally:
        processes.stop()


@contextmanager
def serve_scripted(factory: pytest.TempPathFactory, script: dict[str, Any], *, model: str, key: str,
                   admin_key: str, card: str = DEFAULT_CARD) -> Iterator[Scripted]:
    """A dedicated flashserve serving `model` from a scripted upstream playing `script`; `card` is the model's
    catalog lines above its backend table."""
    folder = factory.mktemp("scripted")
    with scripted_upstream(folder, script) as upstream_url:
        _wait_upstream(upstream_url)
        catalog = folder / "catalog.toml"
        catalog.write_text(raw_v4_entry(model, upstream_url, card))
        process, base, log = start_server(factory, {"FLASHSERVE_API_KEY": key, "FLASHSERVE_ADMIN_KEY": admin_key,
                                                    "FLASHSERVE_CATALOG": str(catalog)},
                                          unset=("FLASHSERVE_DATABASE_URL",))
        try:
            _wait_ready(base, process, log)
            yield Scripted(base, upstream_url, admin_key)
        finally:
            _stop(process, log)
