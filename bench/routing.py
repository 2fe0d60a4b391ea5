"""Routing policies compared: a multi-tenant conversational workload against `flashserve serve --workers 3`.

16 tenants (each its own API key and account), each with its own ~1,500-token system prompt, hold
conversations of several turns, all at once by default (`--concurrency`). The same workload runs once per policy
(round_robin, least_load, prefix_aware), each against a fresh server and with fresh system prompts, so no
policy inherits another's warm caches. For each policy it reports:

* cache hit ratio: sum of cached_tokens / sum of prompt_tokens;
* TTFT p50 and p95 (time to the first content token of a streamed answer);
* throughput: completion tokens / wall time.

Targets (the routing issue): prefix_aware reaches >= 2x round_robin's hit ratio and <= 0.5x its TTFT p50,
with throughput no lower.

    .venv/bin/python bench/routing.py [--turns 4] [--tenants 16] [--concurrency 16] [--workers 3]

Writes bench/results/routing-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import ServerProcess  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "deepseek/deepseek-v4-flash"
ADMIN_KEY = "sk-fs-routing-admin-0123456789abcdef"
POLICIES = ("round_robin", "least_load", "prefix_aware")
WORDS = ("river", "engine", "garden", "signal", "market", "planet", "harbor", "lantern", "circuit", "meadow",
         "archive", "compass", "thunder", "velvet", "quartz", "canyon")


def system_prompt(tenant: int, salt: str, words: int = 1400) -> str:
    rng = random.Random(f"{salt}-{tenant}")
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are the assistant of company {salt}-{tenant}. Its handbook follows. {body}"


async def turn(http: httpx.AsyncClient, key: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage = None, "", None
    async with http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                piece = choice["delta"].get("content")
                if piece:
                    ttft = ttft or time.perf_counter() - t0
                    text += piece
            usage = chunk.get("usage") or usage
    assert usage is not None
    return {"ttft_s": ttft or time.perf_counter() - t0, "text": text, "usage": usage}


async def conversation(http: httpx.AsyncClient, key: str, tenant: int, salt: str, turns: int, max_tokens: int,
                       out: list[dict[str, Any]]) -> None:
    messages = [{"role": "system", "content": system_prompt(tenant, salt)}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t} of tenant {tenant}: summarize one rule."})
        result = await turn(http, key, messages, max_tokens)
        out.append(result)
        messages.append({"role": "assistant", "content": result["text"] or "ok"})


async def run_policy(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    os.environ.update({"FLASHSERVE_WORKERS": str(args.workers), "FLASHSERVE_ROUTING_POLICY": policy,
                       "FLASHSERVE_ADMIN_KEY": ADMIN_KEY, "FLASHSERVE_DEFAULT_BALANCE_USD": "1000"})
    with ServerProcess(0, None) as server:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as http:
            keys = []
            for tenant in range(args.tenants):  # one account and key per tenant: their caches stay apart
                account = (await http.post("/admin/accounts", headers=admin,
                                           json={"name": f"tenant-{tenant}", "balance_usd": "100"})).json()
                key = (await http.post("/admin/keys", headers=admin, json={"account_id": account["id"]})).json()
                keys.append(key["key"])
            results: list[dict[str, Any]] = []
            queue = list(range(args.tenants))
            start = time.perf_counter()

            async def worker() -> None:
                while queue:
                    tenant = queue.pop(0)
                    await conversation(http, keys[tenant], tenant, policy, args.turns, args.max_tokens, results)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            wall = time.perf_counter() - start
    prompt = sum(r["usage"]["prompt_tokens"] for r in results)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results)
    completion = sum(r["usage"]["completion_tokens"] for r in results)
    ttfts = sorted(r["ttft_s"] for r in results)
    row = {"policy": policy, "requests": len(results), "prompt_tokens": prompt, "cached_tokens": cached,
           "hit_ratio": cached / prompt, "ttft_p50_s": statistics.median(ttfts),
           "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], "wall_s": wall,
           "throughput_tok_s": completion / wall}
    print(f"{policy:13} hit ratio {row['hit_ratio']:.3f}  TTFT p50 {row['ttft_p50_s']:.3f}s  "
          f"p95 {row['ttft_p95_s']:.3f}s  throughput {row['throughput_tok_s']:.1f} tok/s  ({len(results)} turns, "
          f"{wall:.0f}s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16,
                    help="conversations in flight at once (default: every tenant at once)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    rows = {policy: asyncio.run(run_policy(policy, args)) for policy in POLICIES}
    rr, pa = rows["round_robin"], rows["prefix_aware"]
    targets = {
        "hit ratio >= 2x round_robin": pa["hit_ratio"] >= 2 * rr["hit_ratio"],
        "TTFT p50 <= 0.5x round_robin": pa["ttft_p50_s"] <= 0.5 * rr["ttft_p50_s"],
        "throughput >= round_robin": pa["throughput_tok_s"] >= rr["throughput_tok_s"],
    }
    print(f"prefix_aware vs round_robin: hit ratio {pa['hit_ratio'] / max(rr['hit_ratio'], 1e-9):.2f}x, "
          f"TTFT p50 {pa['ttft_p50_s'] / rr['ttft_p50_s']:.2f}x, "
          f"throughput {pa['throughput_tok_s'] / rr['throughput_tok_s']:.2f}x")
    for name, met in targets.items():
        print(f"{'MET   ' if met else 'MISSED'} {name}")
    now = dt.datetime.now(dt.UTC)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"routing-{now.strftime('%Y-%m-%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]), "args": vars(args),
                               "timestamp_utc": now.isoformat(timespec="seconds"), "results": rows,
                               "targets": targets}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
