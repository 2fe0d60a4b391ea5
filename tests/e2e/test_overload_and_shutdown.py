"""Admission and shutdown against real server processes.

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


def test_a_full_queue_answers_503_and_a_queued_stream_keeps_alive(tmp_path_factory: pytest.TempPathFactory) -> None:
    process, base, log, data_dir = serve(tmp_path_factory, max_num_seqs="1", max_queued_requests="1",
                                         sse_keepalive_s="0.2")
    try:
        running = Stream(base, 150)
        running.start()
        assert running.first_token.wait(60), "the first request never started"
        queued = Stream(base, 4)
        queued.start()
        time.sleep(0.3)  # the second request is now in the engine's queue, behind the first
        r = httpx.post(f"{base}/v1/chat/completions", json=body(4, stream=False), headers=HEADERS, timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "overloaded" and r.headers.get("retry-after")
        running.join(120)
        queued.join(120)
        assert running.status == queued.status == 200
        first_data = next(i for i, x in enumerate(queued.lines) if x.startswith("data: {") and '"content":""' not in
                          x.replace(" ", "") and '"content":' in x)
        assert ": keep-alive" in queued.lines[:first_data], queued.lines[:first_data]
        assert queued.lines[-1] == "data: [DONE]"
        # Two answered requests, two usage rows: the refused one cost nothing and left no record.
        assert len(usage_rows(data_dir)) == 2
        ok = httpx.post(f"{base}/v1/chat/completions", json=body(2, stream=False), headers=HEADERS, timeout=60)
        assert ok.status_code == 200
    finally:
        _stop(process, log)


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


def test_sigterm_past_the_drain_time_aborts_and_records(tmp_path_factory: pytest.TempPathFactory) -> None:
    stream, data_dir = sigterm_during_a_stream(tmp_path_factory, "0.5", 4000)
    errors = [e for e in stream.events() if "error" in e]
    assert errors and errors[0]["error"]["code"] == "request_aborted", stream.lines[-3:]
    assert stream.lines[-1] == "data: [DONE]"
    [(request_id, status, completion, cost)] = usage_rows(data_dir)
    assert status == "error" and 0 < completion < 4000 and cost > 0


def test_admin_engine_report_shows_the_block_pool_sound(tmp_path_factory: pytest.TempPathFactory) -> None:
    process, base, log, data_dir = serve(tmp_path_factory, admin_key="sk-fs-admin-engine-report")
    try:
        admin = {"Authorization": "Bearer sk-fs-admin-engine-report"}
        assert httpx.get(f"{base}/admin/engine", headers=HEADERS, timeout=30).status_code in (401, 403)
        for _ in range(3):
            r = httpx.post(f"{base}/v1/chat/completions", json=body(8, stream=False), headers=HEADERS, timeout=60)
            assert r.status_code == 200
        report = httpx.get(f"{base}/admin/engine", headers=admin, timeout=30).json()["models"][MODEL]
        assert report["invariants_ok"] and report["leaked_blocks"] == 0 and report["active_requests"] == 0
        assert report["free_blocks"] + report["used_blocks"] == report["total_blocks"]
        assert report["cached_blocks"] > 0  # the finished prompts stay in the prefix cache, free but kept
    finally:
        _stop(process, log)


def test_a_non_streaming_client_that_leaves_aborts_its_request(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The client gives up (a read timeout closes its connection) while the answer is being generated: the
    engine drops the request at once and its usage is recorded as cancelled, with the tokens made so far."""
    process, base, log, data_dir = serve(tmp_path_factory, admin_key="sk-fs-admin-disconnect")
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=body(3000, stream=False), headers=HEADERS,
                       timeout=httpx.Timeout(60, read=1.5))
        admin = {"Authorization": "Bearer sk-fs-admin-disconnect"}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            report = httpx.get(f"{base}/admin/engine", headers=admin, timeout=10).json()["models"][MODEL]
            if report["active_requests"] == 0 and usage_rows(data_dir):
                break
            time.sleep(0.1)
        assert report["active_requests"] == 0 and report["leaked_blocks"] == 0
        [(request_id, status, completion, cost)] = usage_rows(data_dir)
        assert status == "cancelled" and 0 < completion < 3000 and cost > 0
    finally:
        _stop(process, log)
