"""Soak test: a real `flashserve serve` process under a mixed, partly hostile load, then a consistency audit.

For `--duration` seconds (10 minutes by default) 64 concurrent clients loop over a mix of requests:
streaming and non-streaming chat, JSON mode, streams the client cuts after a few chunks, malformed bodies,
oversized bodies, and requests on a key whose rate limit they exceed. Afterwards it checks, and prints:

* the server still answers correctly (a greedy question with a known answer);
* the engine's block pool is sound (`/admin/engine`: free + used = total, invariants hold, no leaked block);
* usage rows = requests the server accepted (every 200, the cut streams included);
* the balance change = the sum of the recorded costs;
* resident memory grew less than 10% between the end of the warm-up and the end.

    .venv/bin/python bench/soak.py [--duration 600] [--clients 64] [--warmup 60]

Writes bench/results/soak-<UTC time>.json. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import ServerProcess  # noqa: E402 - the benchmark's own server launcher

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "deepseek/deepseek-v4-flash"
ADMIN_KEY = "sk-fs-soak-admin-0123456789abcdef"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
KINDS = ("stream", "complete", "json", "cut", "malformed", "oversized", "over_limit")
WEIGHTS = (30, 25, 10, 10, 8, 4, 13)


@dataclass
class Tally:
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted: int = 0  # requests answered 200 (a usage row each)
    unexpected: list[str] = field(default_factory=list)

    def note(self, kind: str, status: int, ok: bool, detail: str = "") -> None:
        self.sent[kind] += 1
        self.statuses[f"{kind}:{status}"] += 1
        if status == 200:
            self.accepted += 1
        if not ok and len(self.unexpected) < 20:
            self.unexpected.append(f"{kind} -> {status} {detail[:200]}")


def chat_body(rng: random.Random, **extra: Any) -> dict[str, Any]:
    topic = rng.choice(["the sea", "a robot", "autumn", "trains", "a small town", "bees"])
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
            "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0, 0.7, 1.0]), **extra}


async def one(kind: str, http: httpx.AsyncClient, key: str, limited_key: str, rng: random.Random,
              tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    url = "/v1/chat/completions"
    if kind in ("stream", "cut"):
        body = chat_body(rng, stream=True, stream_options={"include_usage": True})
        async with http.stream("POST", url, json=body, headers=headers) as r:
            chunks, last = 0, ""
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks, last = chunks + 1, line
                    if kind == "cut" and chunks >= 3:
                        break  # leaving the block drops the connection mid-stream
            finished = kind == "cut" or last == "data: [DONE]"
            tally.note(kind, r.status_code, r.status_code == 503 or (r.status_code == 200 and finished), last)
        return
    if kind in ("complete", "json"):
        extra = {"response_format": {"type": "json_object"},
                 "messages": [{"role": "user", "content": "Reply with a JSON object about a cat."}]} \
            if kind == "json" else {}
        r = await http.post(url, json=chat_body(rng, **extra), headers=headers)
        ok = r.status_code in (200, 503)
        if r.status_code == 200 and kind == "json" and r.json()["choices"][0]["finish_reason"] == "stop":
            json.loads(r.json()["choices"][0]["message"]["content"])  # JSON mode gives JSON when it ends
        tally.note(kind, r.status_code, ok, r.text)
        return
    if kind == "malformed":
        raw = rng.choice([b"{not json", b"[]", b'{"model": 5}', b'{"model": "x", "messages": "hi"}',
                          json.dumps(chat_body(rng, temperature=9)).encode(),
                          json.dumps(chat_body(rng, logit_bias={"999999999": 5})).encode()])
        r = await http.post(url, content=raw, headers={**headers, "content-type": "application/json"})
        tally.note(kind, r.status_code, r.status_code in (400, 404, 422), r.text)
        return
    if kind == "oversized":
        raw = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "' + \
            b"y" * (9 << 20) + b'"}]}'
        r = await http.post(url, content=raw, headers={**headers, "content-type": "application/json"})
        tally.note(kind, r.status_code, r.status_code == 413, r.text)
        return
    r = await http.post(url, json=chat_body(rng, max_tokens=4), headers={"Authorization": f"Bearer {limited_key}"})
    tally.note(kind, r.status_code, r.status_code in (200, 429), r.text)


async def client_loop(i: int, base: str, key: str, limited_key: str, stop_at: float, tally: Tally) -> None:
    rng = random.Random(i)
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=2)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        while time.monotonic() < stop_at:
            kind = rng.choices(KINDS, WEIGHTS)[0]
            try:
                await one(kind, http, key, limited_key, rng, tally)
            except httpx.HTTPError as exc:
                tally.note(kind, 0, False, repr(exc))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def audit(base: str, key: str, account_id: str, balance_before: int, tally: Tally) -> dict[str, Any]:
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        answer = await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 16})
        correct = answer.status_code == 200 and "Paris" in answer.json()["choices"][0]["message"]["content"]
        deadline = time.monotonic() + 30
        while True:  # records of the last requests land just after their responses
            engine = (await http.get("/admin/engine", headers=admin_headers)).json()["models"][MODEL]
            records = (await http.get("/admin/usage/records", headers=admin_headers,
                                      params={"limit": 10000})).json()["data"]
            if (len(records) >= tally.accepted + 1 and engine["active_requests"] == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        accounts = (await http.get("/admin/accounts", headers=admin_headers)).json()["data"]
    balance_after = next(a for a in accounts if a["id"] == account_id)["balance_pusd"]
    cost = sum(r["cost_pusd"] for r in records)
    return {"answers_correctly": correct, "engine": engine, "usage_rows": len(records),
            "accepted_requests": tally.accepted + 1, "balance_change_pusd": balance_before - balance_after,
            "sum_of_costs_pusd": cost, "statuses": dict(sorted(tally.statuses.items()))}


async def run(args: argparse.Namespace) -> int:
    env = {"FLASHSERVE_ADMIN_KEY": ADMIN_KEY, "FLASHSERVE_DEFAULT_BALANCE_USD": "100000"}
    os.environ.update(env)
    with ServerProcess(0, None) as server:
        base, key = server.base_url, server_key()
        pid = server.process.pid  # type: ignore[union-attr]
        admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            [account] = [a for a in (await http.get("/admin/accounts", headers=admin_headers)).json()["data"]
                         if a["name"] == "default"]
            limited = (await http.post("/admin/keys", headers=admin_headers,
                                       json={"account_id": account["id"], "name": "soak-limited", "rpm": 30})).json()
        balance_before = account["balance_pusd"]
        tally = Tally()
        start = time.monotonic()
        stop_at = start + args.duration
        clients = [asyncio.create_task(client_loop(i, base, key, limited["key"], stop_at, tally))
                   for i in range(args.clients)]
        await asyncio.sleep(min(args.warmup, args.duration / 2))
        rss_warm = rss_mb(pid)
        await asyncio.gather(*clients)
        elapsed = time.monotonic() - start
        rss_end = rss_mb(pid)
        report = await audit(base, key, account["id"], balance_before, tally)
    report |= {"duration_s": round(elapsed, 1), "clients": args.clients, "requests": sum(tally.sent.values()),
               "by_kind": dict(tally.sent), "unexpected": tally.unexpected, "rss_mb_after_warmup": round(rss_warm, 1),
               "rss_mb_end": round(rss_end, 1), "rss_growth": round(rss_end / rss_warm - 1, 4)}
    checks = {
        "server answers correctly": report["answers_correctly"],
        "block pool sound (free + used = total, invariants, no leak)":
            report["engine"]["invariants_ok"] and report["engine"]["leaked_blocks"] == 0
            and report["engine"]["free_blocks"] + report["engine"]["used_blocks"] == report["engine"]["total_blocks"],
        "usage rows = accepted requests": report["usage_rows"] == report["accepted_requests"],
        "balance change = sum of costs": report["balance_change_pusd"] == report["sum_of_costs_pusd"],
        "RSS growth after warm-up < 10%": report["rss_growth"] < 0.10,
        "no unexpected answer": not tally.unexpected,
    }
    report["checks"] = checks
    print(json.dumps({k: v for k, v in report.items() if k not in ("statuses", "engine")}, indent=2))
    print("engine:", json.dumps(report["engine"]))
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    RESULTS.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    out = RESULTS / f"soak-{now.strftime('%Y-%m-%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                               "timestamp_utc": now.isoformat(timespec="seconds"), **report}, indent=2))
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


def server_key() -> str:
    from serve_bench import API_KEY

    return API_KEY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline is taken")
    sys.exit(asyncio.run(run(ap.parse_args())))


if __name__ == "__main__":
    main()
