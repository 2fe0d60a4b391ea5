"""`flashserve serve --workers 2`: two engine worker processes behind one router, with prefix-aware routing.

- A tenant's conversation keeps going to the replica that holds its prefix: its second turn is served
  from that worker's prompt cache (cached_tokens > 0), and usage is billed by the router's own ledger.
- One worker is killed under load: every request either completes or ends with a clear error (none hangs
  or vanishes), later requests fail over to the surviving worker, and usage rows = accepted requests.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import _stop, _wait_ready, start_server

KEY = "sk-fs-router-e2e-client"
ADMIN = "sk-fs-router-e2e-admin"
MODEL = "deepseek/deepseek-v4-flash"
HEADERS = {"Authorization": f"Bearer {KEY}"}
SYSTEM = " ".join(f"Rule {i}: answer politely and precisely about topic {i}." for i in range(60))


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"FLASHSERVE_API_KEY": KEY, "FLASHSERVE_ADMIN_KEY": ADMIN, "FLASHSERVE_WORKERS": "2",
           "FLASHSERVE_ROUTING_POLICY": "prefix_aware"}
    process, base, log = start_server(tmp_path_factory, env, unset=("FLASHSERVE_DATABASE_URL",))
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
    answered = 2 + sum(o == "ok" for o in outcomes) + 3  # this module's 200s so far
    failed_midway = sum(o.startswith("error 5") for o in outcomes)
    assert answered <= len(records) <= answered + failed_midway, (len(records), outcomes)
    assert json.dumps(records)  # every row is well formed
