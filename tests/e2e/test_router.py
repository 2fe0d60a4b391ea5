"""`flashserve serve --workers 2`: two engine worker processes behind one router, with prefix-aware routing.

- A tenant's conversation keeps going to the replica that holds its prefix: its second turn is served
  from that worker's prompt cache (cached_tokens > 0), and usage is billed by the router's own ledger.
- A request's x-request-id reaches the worker that served it (its JSON log line) and the usage row, and the
  router's /metrics counts the requests and includes every worker's engine series (`engine` = its index).
- One worker is killed under load: every request either completes or ends with a clear error (none hangs
  or vanishes), later requests fail over to the surviving worker, and usage rows = accepted requests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import _stop, _wait_ready, start_server, started_early, starts_early

KEY = "sk-fs-router-e2e-client"
ADMIN = "sk-fs-router-e2e-admin"
MODEL = "deepseek/deepseek-v4-flash"
HEADERS = {"Authorization": f"Bearer {KEY}"}
DATA: dict[str, Path] = {}  # the router's data dir (the workers' logs are in worker-N/worker.log)
SYSTEM = " ".join(f"Rule {i}: answer politely and precisely about topic {i}." for i in range(60))


@starts_early("routed")
def start_routed(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.Popen, str, Path]:
    env = {"FLASHSERVE_API_KEY": KEY, "FLASHSERVE_ADMIN_KEY": ADMIN, "FLASHSERVE_WORKERS": "2",
           "FLASHSERVE_ROUTING_POLICY": "prefix_aware", "FLASHSERVE_LOG_FORMAT": "json"}
    return start_server(tmp_path_factory, env, unset=("FLASHSERVE_DATABASE_URL",))


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, base, log = started_early("routed", tmp_path_factory)
    DATA["dir"] = log.parent / "data"
    try:
        _wait_ready(base, process, log)
        yield base
    finally:
        _stop(process, log)


def chat(base: str, user: str, max_tokens: int = 8, stream: bool = False, timeout: float = 120) -> httpx.Response:
    body = {"model": MODEL, "temperature": 0, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=HEADERS, timeout=timeout)


def replicas(base: str) -> list[dict]:
    report = httpx.get(f"{base}/admin/engine", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).json()
    return report["models"][MODEL]["replicas"]


def test_a_conversation_sticks_to_the_replica_holding_its_prefix(routed: str) -> None:
    first = chat(routed, "Hello there, first question.")
    assert first.status_code == 200, first.text
    second = chat(routed, "Hello there, second question.")
    assert second.status_code == 200
    usage = second.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 256, usage  # the system prompt, from the cache
    served = sorted(r["served"] for r in replicas(routed))
    assert served[-1] >= 2  # both went to the same worker


def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200, r.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_the_request_id_reaches_the_worker_and_metrics_cover_every_worker(routed: str) -> None:
    before = scrape(routed)
    trace = f"worker-trace-{uuid.uuid4().hex[:12]}"
    r = httpx.post(f"{routed}/v1/chat/completions", headers={**HEADERS, "x-request-id": trace}, timeout=120,
                   json={"model": MODEL, "max_tokens": 6, "temperature": 0,
                         "messages": [{"role": "user", "content": "Trace me through the workers."}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == trace and r.json()["id"] != trace
    other = chat(routed, "And a second request.", max_tokens=5)
    assert other.status_code == 200
    usages = [r.json()["usage"], other.json()["usage"]]

    # The worker that served it logged the same id (in JSON, like the router).
    deadline, found = time.monotonic() + 10, []
    while not found and time.monotonic() < deadline:
        for log in sorted(DATA["dir"].glob("worker-*/worker.log")):
            for line in log.read_text(errors="replace").splitlines():
                if trace in line and line.startswith("{"):
                    found.append((log.parent.name, json.loads(line)))
        time.sleep(0.2)
    assert found, "no worker logged the request id"
    assert {entry["request_id"] for _, entry in found} == {trace}
    assert len({worker for worker, _ in found}) == 1  # one worker served it
    assert any(entry.get("message") == "request done" and entry.get("status") == 200 for _, entry in found)

    with httpx.Client(base_url=routed, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
        rows = [x for x in admin.get("/admin/usage/records").json()["data"] if x["x_request_id"] == trace]
    assert len(rows) == 1 and rows[0]["request_id"] == r.json()["id"]

    after = scrape(routed)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("flashserve_requests_total", model=MODEL, surface="chat", status="200") == 2
    prompt = sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert delta("flashserve_tokens_total", model=MODEL, kind="cache_hit") == cached
    assert delta("flashserve_tokens_total", model=MODEL, kind="cache_miss") == prompt - cached
    assert delta("flashserve_tokens_total", model=MODEL, kind="output") == completion
    # The workers' engine series, re-exported by the router with `engine` set to the worker's index.
    assert delta("vllm:generation_tokens_total") == completion
    assert delta("vllm:prompt_tokens_total") == prompt
    assert delta("vllm:prefix_cache_hits_total") == cached
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    engines = {dict(ls)["engine"] for (n, ls) in after if n == "vllm:generation_tokens_total"}
    assert engines and engines <= {"0", "1"}
    assert total(after, "flashserve_routing_decisions_total", policy="prefix_aware") >= 2


def test_killing_a_worker_under_load_loses_no_request_silently(routed: str) -> None:
    outcomes: list[str] = []

    def one(i: int) -> None:
        try:
            r = chat(routed, f"Question number {i}: tell me a long story.", max_tokens=60, timeout=120)
            if r.status_code != 200:
                outcomes.append(f"error {r.status_code} {r.json()['error']['code']}")
            else:
                outcomes.append("ok")
        except httpx.HTTPError as exc:  # a hang or a dropped connection would land here
            outcomes.append(f"lost {exc!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = max(replicas(routed), key=lambda r: r["active"])
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(180)
    assert len(outcomes) == 8 and not [o for o in outcomes if o.startswith("lost")], outcomes
    # The router noticed; new work goes to the survivor.
    deadline = time.monotonic() + 20
    while any(r["healthy"] for r in replicas(routed) if r["pid"] == victim["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    after = [chat(routed, f"After the crash {i}") for i in range(3)]
    assert all(r.status_code == 200 for r in after), [r.text for r in after]
    with httpx.Client(base_url=routed, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
        records = admin.get("/admin/usage/records", params={"limit": 1000}).json()["data"]
    answered = 4 + sum(o == "ok" for o in outcomes) + 3  # this module's 200s so far (2 + 2 in the tests above)
    failed_midway = sum(o.startswith("error 5") for o in outcomes)
    assert answered <= len(records) <= answered + failed_midway, (len(records), outcomes)
    assert json.dumps(records)  # every row is well formed
