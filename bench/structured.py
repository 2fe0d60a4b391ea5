"""Structured-output benchmark: validity of constrained JSON over many schemas, and the grammar's cost per token.

Starts a real `flashserve serve` process the way bench/serve_bench.py does (its ServerProcess and report
helpers are imported), then:

* validity: --schemas JSON schemas generated deterministically (seeded; objects nested to depth 3, arrays with
  minItems/maxItems, enums, required subsets, anyOf, $ref/$defs, bounded integers and numbers, strings with
  maxLength or a format (date, email, ipv4), booleans, null, additionalProperties false), each sent with a short
  prompt naming its fields at temperature 0, max_tokens 96, 8 at a time (streaming). Every output that ends
  "stop" must parse and validate (jsonschema, formats checked); "length" outputs must be at max_tokens exactly.
  Invalid non-truncated outputs are printed in full.
* grammar overhead: one stream at a time, the same prompt decoded for exactly --overhead-tokens tokens as free
  text, as json_object and as a json_schema whose string has a minLength too long to finish (so every mode
  generates the same number of tokens); ms/token = (t_last - t_first) / (completion_tokens - 1), median of --runs
  runs, modes interleaved per run (json_object may close early: it is reported, marked when shorter). Free text
  and the fixed-length json_schema again with 8 concurrent streams (aggregate tok/s). The machine's load average
  is recorded: other processes on a small machine make these timings noisy.

Writes bench/results/structured-<UTC date>.json with the machine, versions and command line. A benchmark, not a
test: it asserts nothing about speed, but exits 1 if a non-truncated output was invalid.

    .venv/bin/python bench/structured.py [--schemas 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from jsonschema import Draft202012Validator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (  # noqa: E402 - the sibling module, found through the path set just above
    API_KEY,
    DEFAULT_MODEL,
    REPO,
    RESULTS,
    SUBJECTS,
    ServerProcess,
    _no_nan,
    cpu_model,
    git_commit,
    versions,
)

MAX_TOKENS = 96
CONCURRENCY = 8
SEED = 20261125
MAX_DEPTH = 3
BATCH_MODES = ("free", "json_schema")

# -- schema generator ------------------------------------------------------------------------------------------
THEMES = ["a customer", "a book", "a city", "a product", "a concert", "a web server", "a recipe", "a pet",
          "a movie", "a student", "a hotel booking", "a flight", "a bank transfer", "a football match",
          "a museum", "a smartphone", "a hiking trail", "a restaurant", "a job posting", "a planet"]
WORDS = ["red", "green", "blue", "small", "medium", "large", "new", "used", "open", "closed", "low", "high",
         "north", "south", "east", "west", "gold", "silver", "basic", "premium"]
STRING_FIELDS = ["name", "title", "city", "country", "author", "brand", "category", "street", "summary", "language",
                 "nickname", "genre", "model", "owner_name", "cuisine"]
INT_FIELDS = {"age": (0, 120), "year": (1900, 2030), "count": (0, 100), "rating": (1, 5), "pages": (1, 2000),
              "floor": (-3, 99), "rooms": (1, 12), "minutes": (0, 600), "quantity": (1, 50)}
NUMBER_FIELDS = {"price": (0, 1000), "score": (0, 1), "latitude": (-90, 90), "temperature": (-50, 60),
                 "weight_kg": (0, 500), "distance_km": (0, 10000)}
FORMAT_FIELDS = {"birthday": "date", "date": "date", "created_on": "date", "email": "email",
                 "contact_email": "email", "ip_address": "ipv4"}
BOOL_FIELDS = ["active", "verified", "available", "sold_out", "is_public", "vegetarian"]
NULL_FIELDS = ["deleted_at", "parent_id", "discount"]
ENUM_FIELDS = ["color", "size", "status", "condition", "direction", "tier", "level"]
ANYOF_FIELDS = ["id", "code", "reference", "zip"]
ARRAY_FIELDS = ["tags", "scores", "items", "keywords", "dates", "members"]
OBJECT_FIELDS = ["address", "owner", "location", "details", "author_info", "dimensions", "contact"]


class SchemaGen:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.defs: dict[str, Any] = {}

    def string(self) -> dict:
        return {"type": "string", "maxLength": self.rng.choice([8, 12, 16, 24])}

    def leaf(self, name: str) -> dict:
        r = self.rng
        if name in INT_FIELDS:
            lo, hi = INT_FIELDS[name]
            return {"type": "integer", "minimum": lo, "maximum": hi}
        if name in NUMBER_FIELDS:
            lo, hi = NUMBER_FIELDS[name]
            return {"type": "number", "minimum": lo, "maximum": hi}
        if name in FORMAT_FIELDS:
            return {"type": "string", "format": FORMAT_FIELDS[name]}
        if name in BOOL_FIELDS:
            return {"type": "boolean"}
        if name in NULL_FIELDS:
            return {"type": "null"}
        if name in ENUM_FIELDS:
            values: list[Any] = r.sample(WORDS, r.randint(2, 5))
            if r.random() < 0.2:
                values.append(r.choice([0, 1, None]))
            return {"enum": values}
        if name in ANYOF_FIELDS:
            options = [{"type": "integer", "minimum": 0, "maximum": 99999}, self.string(), {"type": "null"}]
            return {"anyOf": r.sample(options, r.randint(2, 3))}
        return self.string()

    def field(self, name: str, depth: int) -> dict:
        r = self.rng
        if name in ARRAY_FIELDS:
            lo = r.randint(0, 2)
            items_name = {"tags": "name", "keywords": "title", "scores": "score", "dates": "date",
                          "items": "_object", "members": "_object"}[name]
            if items_name == "_object":
                items = self.object(depth + 1, r.randint(1, 2)) if depth < MAX_DEPTH else self.string()
            else:
                items = self.leaf(items_name)
            return {"type": "array", "items": items, "minItems": lo, "maxItems": lo + r.randint(0, 2) + (lo == 0)}
        if name in OBJECT_FIELDS:
            if depth >= MAX_DEPTH:
                return self.string()
            obj = self.object(depth + 1, r.randint(1, 3))
            if r.random() < 0.5:  # through $defs: a named definition, referenced
                key = f"{name}_{len(self.defs)}"
                self.defs[key] = obj
                return {"$ref": f"#/$defs/{key}"}
            return obj
        return self.leaf(name)

    def names(self, k: int, depth: int) -> list[str]:
        pools = [STRING_FIELDS, list(INT_FIELDS), list(NUMBER_FIELDS), list(FORMAT_FIELDS), BOOL_FIELDS, NULL_FIELDS,
                 ENUM_FIELDS, ANYOF_FIELDS, ARRAY_FIELDS]
        if depth < MAX_DEPTH:
            pools.append(OBJECT_FIELDS)
        out: list[str] = []
        while len(out) < k:
            name = self.rng.choice(self.rng.choice(pools))
            if name not in out:
                out.append(name)
        return out

    def object(self, depth: int, k: int) -> dict:
        r = self.rng
        names = self.names(k, depth)
        props = {n: self.field(n, depth) for n in names}
        required = names if r.random() < 0.6 else [n for n in names if r.random() < 0.5] or names[:1]
        out: dict[str, Any] = {"type": "object", "properties": props, "required": required}
        if r.random() < 0.5:
            out["additionalProperties"] = False
        return out


def generate(count: int, seed: int = SEED) -> list[tuple[str, dict]]:
    """`count` (prompt, schema) pairs, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        gen = SchemaGen(rng)
        theme = THEMES[i % len(THEMES)]
        if rng.random() < 0.1:  # a top-level array of small objects
            items = gen.object(2, rng.randint(1, 2))
            schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1, "maxItems": 2}
            fields = list(items["properties"])
            prompt = f"List one or two examples of {theme.split(' ', 1)[1]} as JSON, with {', '.join(fields)}."
        else:
            schema = gen.object(1, rng.randint(1, 4))
            fields = list(schema["properties"])
            prompt = f"Describe {theme} as JSON with the fields {', '.join(fields)}."
        if gen.defs:
            schema = {"$defs": gen.defs, **schema}
        Draft202012Validator.check_schema(schema)
        out.append((prompt, schema))
    return out


# -- requests ----------------------------------------------------------------------------------------------------
@dataclass
class Output:
    status: int
    content: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    t_send: float = 0.0
    t_first: float | None = None
    t_last: float | None = None
    error: str | None = None

    @property
    def ms_per_token(self) -> float:
        if self.t_first is None or self.t_last is None or self.completion_tokens < 2:
            return float("nan")
        return 1000 * (self.t_last - self.t_first) / (self.completion_tokens - 1)

    @property
    def ttft_s(self) -> float:
        return (self.t_first or float("nan")) - self.t_send


async def stream_chat(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                      response_format: dict | None) -> Output:
    payload: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                               "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    if response_format is not None:
        payload["response_format"] = response_format
    out = Output(status=0, t_send=time.perf_counter())
    async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
        out.status = r.status_code
        if r.status_code != 200:
            out.error = (await r.aread()).decode(errors="replace")
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                out.error = json.dumps(chunk["error"])
                continue
            if chunk.get("usage"):
                out.completion_tokens = chunk["usage"]["completion_tokens"]
                out.prompt_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    out.t_last = time.perf_counter()
                    out.t_first = out.t_first or out.t_last
                    out.content += choice["delta"]["content"]
                if choice.get("finish_reason"):
                    out.finish_reason = choice["finish_reason"]
    return out


@dataclass
class Verdict:
    index: int
    verdict: str  # "valid", "invalid", "length", "length_short", "error"
    finish_reason: str | None
    completion_tokens: int
    ttft_s: float
    ms_per_token: float
    detail: str | None = None
    content: str | None = None
    schema: dict | None = field(default=None)
    prompt: str | None = None


def judge(index: int, prompt: str, schema: dict, out: Output) -> Verdict:
    base = {"index": index, "finish_reason": out.finish_reason, "completion_tokens": out.completion_tokens,
            "ttft_s": out.ttft_s, "ms_per_token": out.ms_per_token}
    if out.status != 200 or out.error:
        return Verdict(verdict="error", detail=f"HTTP {out.status}: {out.error}", schema=schema, prompt=prompt, **base)
    if out.finish_reason == "length":
        if out.completion_tokens == MAX_TOKENS:
            return Verdict(verdict="length", **base)
        return Verdict(verdict="length_short", detail=f"length at {out.completion_tokens} < {MAX_TOKENS} tokens",
                       content=out.content, schema=schema, prompt=prompt, **base)
    try:
        value = json.loads(out.content)
    except json.JSONDecodeError as e:
        return Verdict(verdict="invalid", detail=f"not JSON: {e}", content=out.content, schema=schema, prompt=prompt,
                       **base)
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]
    if errors or out.finish_reason != "stop":
        detail = "; ".join(errors) or f"finish_reason {out.finish_reason!r}"
        return Verdict(verdict="invalid", detail=detail, content=out.content, schema=schema, prompt=prompt, **base)
    return Verdict(verdict="valid", **base)


async def run_validity(http: httpx.AsyncClient, model: str, cases: list[tuple[str, dict]]) -> dict:
    sem = asyncio.Semaphore(CONCURRENCY)
    done = 0

    async def one(i: int, prompt: str, schema: dict) -> Verdict:
        nonlocal done
        async with sem:
            fmt = {"type": "json_schema", "json_schema": {"name": f"schema_{i}", "schema": schema, "strict": True}}
            out = await stream_chat(http, model, prompt, MAX_TOKENS, fmt)
        done += 1
        if done % 25 == 0:
            print(f"  {done}/{len(cases)} schemas", flush=True)
        return judge(i, prompt, schema, out)

    t0 = time.perf_counter()
    verdicts = await asyncio.gather(*[one(i, p, s) for i, (p, s) in enumerate(cases)])
    wall = time.perf_counter() - t0
    counts = {k: sum(v.verdict == k for v in verdicts) for k in ("valid", "invalid", "length", "length_short",
                                                                 "error")}
    tokens = sum(v.completion_tokens for v in verdicts)
    finished = [v for v in verdicts if v.verdict == "valid"]
    return {
        "schemas": len(cases), "max_tokens": MAX_TOKENS, "concurrency": CONCURRENCY, "counts": counts,
        "wall_s": wall, "completion_tokens": tokens, "agg_tok_s": tokens / wall,
        "median_ttft_s": median([v.ttft_s for v in verdicts]),
        "median_completion_tokens_stop": median([v.completion_tokens for v in finished]),
        "problems": [asdict(v) for v in verdicts if v.verdict not in ("valid", "length")],
        "per_schema": [{"index": v.index, "verdict": v.verdict, "completion_tokens": v.completion_tokens,
                        "ttft_s": v.ttft_s} for v in verdicts],
    }


# -- grammar overhead ------------------------------------------------------------------------------------------
def overhead_prompt(run: int) -> str:
    return (f"Write a very long and detailed story about {SUBJECTS[run % len(SUBJECTS)]}. "
            'Answer with a JSON object: {"story": "..."}.')


def overhead_modes(tokens: int) -> dict[str, dict | None]:
    # minLength far beyond `tokens` tokens: the string cannot close, so the generation runs to max_tokens.
    long_story = {"type": "object", "properties": {"story": {"type": "string", "minLength": 8 * tokens}},
                  "required": ["story"], "additionalProperties": False}
    return {"free": None, "json_object": {"type": "json_object"},
            "json_schema": {"type": "json_schema", "json_schema": {"name": "story", "schema": long_story}}}


async def run_overhead(http: httpx.AsyncClient, model: str, runs: int, tokens: int) -> dict:
    modes = overhead_modes(tokens)
    single: dict[str, list[dict]] = {m: [] for m in modes}
    for run in range(runs):
        for mode, fmt in modes.items():
            out = await stream_chat(http, model, overhead_prompt(run), tokens, fmt)
            if out.status != 200:
                raise RuntimeError(f"overhead run failed: HTTP {out.status}: {out.error}")
            single[mode].append({"run": run, "completion_tokens": out.completion_tokens,
                                 "finish_reason": out.finish_reason, "ms_per_token": out.ms_per_token,
                                 "ttft_s": out.ttft_s})
    # json_object may close early (the model decides), so only the two fixed-length modes run as a batch.
    batch: dict[str, list[dict]] = {m: [] for m in BATCH_MODES}
    for run in range(runs):
        for mode in BATCH_MODES:
            fmt = modes[mode]
            t0 = time.perf_counter()
            outs = await asyncio.gather(*[stream_chat(http, model, overhead_prompt(run * CONCURRENCY + i), tokens, fmt)
                                          for i in range(CONCURRENCY)])
            wall = time.perf_counter() - t0
            n = sum(o.completion_tokens for o in outs)
            batch[mode].append({"run": run, "completion_tokens": n, "wall_s": wall, "agg_tok_s": n / wall,
                                "median_ms_per_token": median([o.ms_per_token for o in outs]),
                                "all_at_max_tokens": all(o.completion_tokens == tokens for o in outs)})
    summary = {}
    for mode in modes:
        s = single[mode]
        summary[mode] = {
            "median_ms_per_token": median([r["ms_per_token"] for r in s]),
            "all_at_max_tokens": all(r["completion_tokens"] == tokens for r in s),
            "completion_tokens": [r["completion_tokens"] for r in s],
        }
        if mode in batch:
            summary[mode].update({
                "batch8_median_agg_tok_s": median([r["agg_tok_s"] for r in batch[mode]]),
                "batch8_median_ms_per_token": median([r["median_ms_per_token"] for r in batch[mode]]),
                "batch8_all_at_max_tokens": all(r["all_at_max_tokens"] for r in batch[mode]),
            })
    free = summary["free"]["median_ms_per_token"]
    for mode in modes:
        summary[mode]["overhead_ms_per_token"] = summary[mode]["median_ms_per_token"] - free
        summary[mode]["overhead_pct"] = 100 * (summary[mode]["median_ms_per_token"] / free - 1)
    free_agg = summary["free"]["batch8_median_agg_tok_s"]
    for mode in BATCH_MODES:
        summary[mode]["batch8_agg_change_pct"] = 100 * (summary[mode]["batch8_median_agg_tok_s"] / free_agg - 1)
    return {"tokens": tokens, "runs": runs, "single": single, "batch8": batch, "summary": summary}


# -- report -------------------------------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def print_report(validity: dict, overhead: dict) -> None:
    c = validity["counts"]
    stopped = c["valid"] + c["invalid"]
    print(f"\nvalidity: {validity['schemas']} schemas, max_tokens {validity['max_tokens']}, "
          f"concurrency {validity['concurrency']}, temperature 0")
    print(f"  ended 'stop' and valid      {c['valid']:>4} / {stopped} stopped")
    print(f"  ended 'stop' but INVALID    {c['invalid']:>4}")
    print(f"  hit 'length' (at max_tokens) {c['length']:>3}")
    print(f"  'length' before max_tokens  {c['length_short']:>4}")
    print(f"  request errors              {c['error']:>4}")
    print(f"  wall {validity['wall_s']:.1f}s, {validity['completion_tokens']} completion tokens, "
          f"{validity['agg_tok_s']:.1f} tok/s aggregate, median TTFT {validity['median_ttft_s']:.2f}s "
          f"(includes grammar compile), median tokens of a stopped output "
          f"{validity['median_completion_tokens_stop']:.0f}")
    for p in validity["problems"]:
        print(f"\n  PROBLEM #{p['index']} ({p['verdict']}): {p['detail']}\n    prompt:  {p['prompt']}\n"
              f"    schema:  {json.dumps(p['schema'])}\n    content: {p['content']!r}")
    s = overhead["summary"]
    print(f"\ngrammar overhead: up to {overhead['tokens']} tokens per generation, same prompt in every mode, "
          f"median of {overhead['runs']} runs")
    print(f"  1 stream      {'ms/token':>9} {'vs free':>9} {'%':>7}  completion tokens per run")
    for mode, v in s.items():
        print(f"  {mode:<12}  {v['median_ms_per_token']:>9.2f} {v['overhead_ms_per_token']:>+9.2f} "
              f"{v['overhead_pct']:>+6.1f}%  {v['completion_tokens']}"
              + ("" if v["all_at_max_tokens"] else "  (not all at max: not the same length)"))
    print(f"  8 streams     {'agg tok/s':>9} {'vs free':>9}  {'ms/token/stream':>15}  all at max")
    for mode in BATCH_MODES:
        v = s[mode]
        print(f"  {mode:<12}  {v['batch8_median_agg_tok_s']:>9.1f} {v['batch8_agg_change_pct']:>+8.1f}%  "
              f"{v['batch8_median_ms_per_token']:>15.2f}  {v['batch8_all_at_max_tokens']}")


def output_path(now: dt.datetime) -> Path:
    path = RESULTS / f"structured-{now:%Y-%m-%d}.json"
    return path if not path.exists() else RESULTS / f"structured-{now:%Y-%m-%dT%H%M%SZ}.json"


async def run_all(base_url: str, model: str, cases: list[tuple[str, dict]], runs: int, tokens: int) -> dict:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=900.0, limits=limits) as http:
        await stream_chat(http, model, "Say hello.", 8, {"type": "json_object"})  # warm-up (and json_object compile)
        t0 = time.perf_counter()
        validity = await run_validity(http, model, cases)
        print(f"validity done in {time.perf_counter() - t0:.0f}s; measuring grammar overhead", flush=True)
        overhead = await run_overhead(http, model, runs, tokens)
    return {"validity": validity, "overhead": overhead}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemas", type=int, default=200, help="number of generated schemas")
    ap.add_argument("--runs", type=int, default=3, help="runs per overhead measurement (medians are reported)")
    ap.add_argument("--overhead-tokens", type=int, default=MAX_TOKENS, help="tokens per overhead generation")
    ap.add_argument("--seed", type=int, default=SEED, help="seed of the schema generator")
    ap.add_argument("--port", type=int, default=0, help="port for the server (0: a free one)")
    ap.add_argument("--model", default=None, help="passed to `flashserve serve --model`")
    ap.add_argument("--request-model", default=None, help=f"model id in the requests (default {DEFAULT_MODEL})")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output path (default bench/results/structured-<date>.json)")
    args = ap.parse_args(argv)
    model = args.request_model or DEFAULT_MODEL
    cases = generate(args.schemas, args.seed)

    now = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with ServerProcess(args.port, args.model) as server:
        print(f"server up on {server.base_url} in {server.startup_s:.1f}s; {len(cases)} schemas, "
              f"{args.runs} overhead runs", flush=True)
        try:
            res = asyncio.run(run_all(server.base_url, model, cases, args.runs, args.overhead_tokens))
        except Exception:
            print(f"--- server log ---\n{server.log_tail()}", file=sys.stderr)
            raise
        server_cmd = shlex.join(server.cmd)
        startup_s = server.startup_s
    total_s = time.perf_counter() - t_start
    load_after = os.getloadavg()

    print_report(res["validity"], res["overhead"])
    print(f"\ntotal {total_s:.0f}s; load average (1, 5, 15 min) before "
          f"{', '.join(f'{x:.2f}' for x in load_before)}, after {', '.join(f'{x:.2f}' for x in load_after)}")
    report = {
        "timestamp_utc": now.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "server_command": server_cmd,
        "git_commit": git_commit(),
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "versions": {**versions(), **_more_versions()},
        "params": {"model": model, "schemas": args.schemas, "seed": args.seed, "max_tokens": MAX_TOKENS,
                   "concurrency": CONCURRENCY, "runs": args.runs, "overhead_tokens": args.overhead_tokens,
                   "max_depth": MAX_DEPTH},
        "server_startup_s": startup_s,
        "total_s": total_s,
        "results": res,
    }
    out = args.out or output_path(now)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_no_nan(report), indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    bad = res["validity"]["counts"]
    return 1 if bad["invalid"] or bad["length_short"] or bad["error"] else 0


def _more_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("xgrammar", "jsonschema"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
