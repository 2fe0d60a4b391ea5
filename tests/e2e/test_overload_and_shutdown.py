"""Shutdown against a real server process: the smoke test of SIGTERM's drain.

The rest moved in-process (tests/api/test_billing.py, test_drain.py): 503 `overloaded` with queued streams
keeping alive, the drain time running out (aborted, error event, usage recorded), the /admin/engine report,
and a non-streaming client that leaves. What this file's original tests said:

- Overload: with one running slot and one queue place, a third request gets 503 `overloaded` with
  retry-after and no usage row, while the queued stream receives SSE keep-alive comments until its turn.
- SIGTERM: new requests get 503 at once, a request in flight finishes within the drain time, its usage is
  in the ledger, and the process exits 0. With a drain time shorter than the request, the request is
  aborted, its stream ends with an error event, and its (partial) usage is still recorded.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import _stop, _wait_ready, start_server

MODEL = "deepseek/deepseek-v4-flash"
KEY = "sk-fs-overload-and-shutdown-e2e"
NO_EOS = {"2": -100, "0": -100}  # SmolLM2's end-of-turn tokens: generation runs to max_tokens
HEADERS = {"Authorization": f"Bearer {KEY}"}


def body(max_tokens: int, stream: bool = True) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "temperature": 0,
            "max_tokens": max_tokens, "logit_bias": NO_EOS, "stream": stream}


class Stream(threading.Thread):
    """A streaming request read line by line in the background."""

    def __init__(self, base: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.max_tokens = base, max_tokens
        self.lines: list[str] = []
        self.status: int | None = None
        self.first_token = threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", f"{self.base}/v1/chat/completions", json=body(self.max_tokens), headers=HEADERS,
                          timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if not line:
                    continue  # the blank line that ends each event
                self.lines.append(line)
                if '"content":' in line and '"content":""' not in line.replace(" ", ""):
                    self.first_token.set()

    def events(self) -> list[dict]:
        return [json.loads(x[6:]) for x in self.lines if x.startswith("data: {")]


def usage_rows(data_dir: Path) -> list[tuple]:
    with sqlite3.connect(data_dir / "flashserve.db") as db:
        return db.execute("SELECT request_id, status, completion_tokens, cost_pusd FROM usage_records").fetchall()


def serve(tmp_path_factory: pytest.TempPathFactory, **env: str) -> tuple:
    data_dir = tmp_path_factory.mktemp("lifecycle") / "data"
    overrides = {"FLASHSERVE_API_KEY": KEY, **{f"FLASHSERVE_{k.upper()}": v for k, v in env.items()}}
    process, base, log = start_server(tmp_path_factory, overrides, unset=("FLASHSERVE_DATABASE_URL",),
                                      data_dir=data_dir)
    _wait_ready(base, process, log)
    return process, base, log, data_dir


def sigterm_during_a_stream(tmp_path_factory: pytest.TempPathFactory, drain_s: str, max_tokens: int,
                            meanwhile: Callable[[str], None] = lambda base: None) -> tuple[Stream, Path]:
    """Start a server, start a stream, SIGTERM the server once tokens flow, run `meanwhile(base)`, and
    check the process exits 0; returns the stream and the data dir (for the ledger)."""
    process, base, log, data_dir = serve(tmp_path_factory, shutdown_drain_s=drain_s)
    try:
        stream = Stream(base, max_tokens)
        stream.start()
        assert stream.first_token.wait(60)
        process.send_signal(signal.SIGTERM)
        meanwhile(base)
        stream.join(120)
        assert process.wait(timeout=60) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            _stop(process, log)
    return stream, data_dir


def test_sigterm_drains_in_flight_work_then_exits_0(tmp_path_factory: pytest.TempPathFactory) -> None:
    def new_work_is_refused(base: str) -> None:
        time.sleep(0.2)
        r = httpx.post(f"{base}/v1/chat/completions", json=body(2, stream=False), headers=HEADERS, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
        assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "draining"

    stream, data_dir = sigterm_during_a_stream(tmp_path_factory, "60", 120, new_work_is_refused)
    assert stream.lines[-1] == "data: [DONE]"
    assert stream.events()[-1]["choices"][0]["finish_reason"] == "length"
    [(request_id, status, completion, cost)] = usage_rows(data_dir)
    assert status == "ok" and completion == 120 and cost > 0
