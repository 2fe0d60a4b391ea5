"""Serving benchmark: latency and throughput of a real `flashserve serve` process, through its HTTP API.

Starts the server itself (as the e2e tests do: `python -m flashserve serve` on a free 127.0.0.1 port
with a temporary data dir and API key), then measures with streaming requests:

* decode tok/s of one stream: 128 tokens after a short prompt, (completion_tokens - 1) / (t_last - t_first),
  where t_first / t_last are the arrival times of the first / last content delta;
* TTFT of a ~500-token prompt with max_tokens 1 (a fresh nonce per run defeats the prefix cache; the
  same prompt sent again gives the cached TTFT);
* aggregate tok/s at concurrency 1 and 8: the completion tokens of all streams / wall time of the batch.

Each measurement runs --runs times; the table and the JSON report medians (raw runs are kept in the
JSON). Results go to bench/results/<UTC date>.json with the machine, versions and command line.
This is a benchmark, not a test: it asserts nothing about speed.

    .venv/bin/python bench/serve_bench.py [--runs 3] [--port 0] [--model ID]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from peer_worker import no_nan  # the sibling module: bench/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
API_KEY = "sk-flashserve-bench-0123456789abcdef"
DEFAULT_MODEL = "deepseek/deepseek-v4-flash"
DECODE_TOKENS = 128
TTFT_PROMPT_TOKENS = 500
CONCURRENT_TOKENS = 128
SUBJECTS = ["a dragon who bakes bread", "a lighthouse keeper", "a robot chef", "a lost kitten",
            "a pirate queen", "a haunted library", "a time-travelling clock", "a mountain village",
            "a deep-sea explorer", "a clockwork bird", "a desert caravan", "a city of glass"]
FILLER = ("The history of the river valley is long and varied. Farmers planted wheat and barley along its "
          "banks, merchants carried salt and wool downstream, and every spring the floods renewed the soil. ")


# -- server process ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, port: int, serve_model: str | None, startup_timeout: float = 300.0) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="flashserve-bench-"))
        self.log_path = self.workdir / "server.log"
        python = REPO / ".venv" / "bin" / "python"
        self.cmd = [str(python) if python.exists() else sys.executable, "-m", "flashserve", "serve",
                    "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.workdir / "data")]
        if serve_model:
            self.cmd += ["--model", serve_model]
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.startup_s = float("nan")

    def __enter__(self) -> ServerProcess:
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "FLASHSERVE_API_KEY": API_KEY, "PYTHONUNBUFFERED": "1"}
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = t0 + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"server exited with code {self.process.returncode} during startup")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self._fail(f"server not ready after {self.startup_timeout:.0f}s")
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _fail(self, why: str) -> None:
        self.__exit__()
        sys.exit(f"{why}\n$ {shlex.join(self.cmd)}\n--- server log ---\n{self.log_tail()}")


# -- one streamed request --------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    t_send: float
    t_first: float | None
    t_last: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None


async def sse_chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a chat-completions event stream, up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)


async def stream_chat(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                      temperature: float = 0.0) -> StreamResult:
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
               "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
    t_send = time.perf_counter()
    t_first = t_last = None
    usage: dict | None = None
    finish = None
    async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')}")
        async for chunk in sse_chunks(r):
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    t_last = time.perf_counter()
                    t_first = t_first or t_last
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
    if usage is None:
        raise RuntimeError("stream ended without a usage chunk")
    return StreamResult(t_send, t_first, t_last, usage["prompt_tokens"], usage["completion_tokens"],
                        usage["prompt_tokens_details"]["cached_tokens"], finish)


def story(i: int) -> str:
    return f"Write a very long and detailed story about {SUBJECTS[i % len(SUBJECTS)]}. Use many chapters."


# -- measurements ----------------------------------------------------------------------------------------------
async def measure_decode(http: httpx.AsyncClient, model: str, run: int) -> dict:
    r = await stream_chat(http, model, story(run), DECODE_TOKENS)
    span = (r.t_last - r.t_first) if r.t_first is not None and r.t_last is not None else 0.0
    tps = (r.completion_tokens - 1) / span if span > 0 and r.completion_tokens > 1 else float("nan")
    return {"completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason,
            "decode_s": span, "decode_tok_s": tps, "ttft_s": (r.t_first or r.t_send) - r.t_send}


def long_prompt(words: int) -> str:
    filler_words = FILLER.split()
    body = " ".join(filler_words[i % len(filler_words)] for i in range(words))
    return f"[{uuid.uuid4().hex}] {body}\nSummarize the text above in one sentence."


async def calibrate_words(http: httpx.AsyncClient, model: str, target_tokens: int) -> int:
    """Words of filler that make a prompt of about target_tokens: two 1-token requests give the tokens per
    word and the fixed overhead (chat template, nonce, question)."""
    a = await stream_chat(http, model, long_prompt(100), 1)
    b = await stream_chat(http, model, long_prompt(300), 1)
    per_word = (b.prompt_tokens - a.prompt_tokens) / 200
    overhead = a.prompt_tokens - 100 * per_word
    return max(1, round((target_tokens - overhead) / per_word))


async def measure_ttft(http: httpx.AsyncClient, model: str, words: int) -> dict:
    prompt = long_prompt(words)
    cold = await stream_chat(http, model, prompt, 1)
    warm = await stream_chat(http, model, prompt, 1)
    return {"prompt_tokens": cold.prompt_tokens, "cached_tokens_cold": cold.cached_tokens,
            "ttft_s": (cold.t_first or cold.t_last or time.perf_counter()) - cold.t_send,
            "cached_tokens_warm": warm.cached_tokens,
            "ttft_cached_s": (warm.t_first or warm.t_last or time.perf_counter()) - warm.t_send}


async def measure_concurrency(http: httpx.AsyncClient, model: str, concurrency: int, run: int) -> dict:
    t0 = time.perf_counter()
    results = await asyncio.gather(*[stream_chat(http, model, story(run * concurrency + i), CONCURRENT_TOKENS)
                                     for i in range(concurrency)])
    wall = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in results)
    return {"concurrency": concurrency, "completion_tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall,
            "mean_ttft_s": statistics.fmean((r.t_first or r.t_send) - r.t_send for r in results)}


def median(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if r[key] == r[key]]  # drop NaN
    return statistics.median(values) if values else float("nan")


async def run_all(base_url: str, model: str, runs: int) -> dict:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=600.0, limits=limits) as http:
        await stream_chat(http, model, "Say hello.", 8)  # warm-up
        decode = [await measure_decode(http, model, i) for i in range(runs)]
        words = await calibrate_words(http, model, TTFT_PROMPT_TOKENS)
        ttft = [await measure_ttft(http, model, words) for _ in range(runs)]
        conc = {c: [await measure_concurrency(http, model, c, i) for i in range(runs)] for c in (1, 8)}
    return {
        "decode": {"runs": decode, "median_tok_s": median(decode, "decode_tok_s"),
                   "median_completion_tokens": median(decode, "completion_tokens")},
        "ttft": {"runs": ttft, "median_s": median(ttft, "ttft_s"), "median_cached_s": median(ttft, "ttft_cached_s"),
                 "median_prompt_tokens": median(ttft, "prompt_tokens")},
        "concurrency": {str(c): {"runs": rs, "median_agg_tok_s": median(rs, "agg_tok_s"),
                                 "median_wall_s": median(rs, "wall_s"), "median_ttft_s": median(rs, "mean_ttft_s")}
                        for c, rs in conc.items()},
    }


# -- report ----------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("flashserve", "torch", "fastapi", "uvicorn", "httpx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    if out["flashserve"] is None:  # not installed, run from the checkout
        with open(REPO / "pyproject.toml", "rb") as f:
            out["flashserve"] = tomllib.load(f)["project"]["version"]
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def print_table(res: dict, runs: int) -> None:
    rows = [
        ("decode tok/s, 1 stream", f"{res['decode']['median_tok_s']:.1f}",
         f"{res['decode']['median_completion_tokens']:.0f} tokens"),
        ("TTFT, cold prompt (s)", f"{res['ttft']['median_s']:.3f}",
         f"{res['ttft']['median_prompt_tokens']:.0f} prompt tokens"),
        ("TTFT, cached prompt (s)", f"{res['ttft']['median_cached_s']:.3f}", "same prompt again"),
    ]
    for c, v in res["concurrency"].items():
        rows.append((f"aggregate tok/s, {c} streams", f"{v['median_agg_tok_s']:.1f}",
                     f"{CONCURRENT_TOKENS} tokens each, wall {v['median_wall_s']:.2f}s"))
    w = max(len(r[0]) for r in rows)
    print(f"\nmedians of {runs} runs")
    print(f"{'metric':<{w}}  {'value':>9}  note")
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:>9}  {note}")


# JSON has no NaN: a measurement that could not be taken is null. One definition, in the stdlib-only peer
# worker (which runs in the peers' own environments and so cannot import this module).
_no_nan = no_nan


def output_path(now: dt.datetime) -> Path:
    path = RESULTS / f"{now:%Y-%m-%d}.json"
    return path if not path.exists() else RESULTS / f"{now:%Y-%m-%dT%H%M%SZ}.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (medians are reported)")
    ap.add_argument("--port", type=int, default=0, help="port for the server (0: a free one)")
    ap.add_argument("--model", default=None,
                    help="passed to `flashserve serve --model` (GGUF file or safetensors folder)")
    ap.add_argument("--request-model", default=None,
                    help=f"model id in the requests (default {DEFAULT_MODEL})")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path (default bench/results/<date>.json)")
    args = ap.parse_args(argv)
    model = args.request_model or DEFAULT_MODEL

    now = dt.datetime.now(dt.UTC)
    with ServerProcess(args.port, args.model) as server:
        print(f"server up on {server.base_url} in {server.startup_s:.1f}s; benchmarking {model!r}, "
              f"{args.runs} runs", flush=True)
        try:
            res = asyncio.run(run_all(server.base_url, model, args.runs))
        except Exception:
            print(f"--- server log ---\n{server.log_tail()}", file=sys.stderr)
            raise
        server_cmd = shlex.join(server.cmd)
        startup_s = server.startup_s

    print_table(res, args.runs)
    report = {
        "timestamp_utc": now.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "server_command": server_cmd,
        "git_commit": git_commit(),
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "params": {"model": model, "runs": args.runs, "decode_tokens": DECODE_TOKENS,
                   "ttft_prompt_tokens": TTFT_PROMPT_TOKENS, "concurrent_tokens": CONCURRENT_TOKENS},
        "server_startup_s": startup_s,
        "results": res,
    }
    out = args.out or output_path(now)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_no_nan(report), indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
