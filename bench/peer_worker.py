"""In-process peer runs for bench/compare.py: llama.cpp (llama-cpp-python) and Hugging Face transformers.

This file runs inside a peer's own virtual environment (bench/.peers/<name>/bin/python), never in flashserve's:
it imports only the standard library at module level and the peer's package inside the function that measures
it. compare.py writes a JSON spec (prompts as chat messages and as token ids, token budgets, runs) and reads back
a JSON result with raw runs; medians and ratios are computed there, so that every peer is summarized the same way.

    bench/.peers/llamacpp/bin/python bench/peer_worker.py llamacpp SPEC.json OUT.json
    bench/.peers/transformers/bin/python bench/peer_worker.py transformers-bf16 SPEC.json OUT.json
    bench/.peers/llamacpp/bin/python bench/peer_worker.py llamacpp-server --model ... (llama_cpp.server's args)

With BENCH_LLAMACPP_NO_EXTRA_BUFTS=1 in the environment, llama.cpp loads the model without its extra buffer types
(the AMX / repacked-weight paths): on some machines (AMX advertised by a VM) those crash in the first batched
decode. compare.py probes for that and sets the variable only then, and says so in the report.

Workloads (the names match compare.py's): `decode` (one stream, tok/s between the first and last generated
token), `ttft` (~500-token prompt, one generated token), `concurrency` (llama.cpp in-process: one stream only,
it has no batching API; transformers: batched `generate` of 1, 8, 32 prompts, left padded).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any


# -- llama.cpp -------------------------------------------------------------------------------------------------
def llamacpp_options() -> None:
    if os.environ.get("BENCH_LLAMACPP_NO_EXTRA_BUFTS") == "1":
        # Llama() reads its defaults from this module function, so wrapping it reaches every model load.
        import llama_cpp.llama_cpp as lib

        default_params = lib.llama_model_default_params

        def params() -> Any:
            p = default_params()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = params


def run_llamacpp(spec: dict[str, Any]) -> dict[str, Any]:
    llamacpp_options()
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_ctx=4096, n_threads=spec["threads"], n_threads_batch=spec["threads"],
                verbose=False)
    load_s = time.perf_counter() - t0
    # The spec is JSON, so token ids arrive as string keys; llama-cpp-python wants ints.
    logit_bias = {int(k): v for k, v in spec["logit_bias"].items()} if spec["logit_bias"] else None

    def stream(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        # repeat_penalty 1.0: llama-cpp-python's default (1.1) would change the greedy output the other peers give.
        t_send = time.perf_counter()
        t_first = t_last = None
        deltas = 0
        finish = None
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                                repeat_penalty=1.0, stream=True, logit_bias=logit_bias):
            choice = chunk["choices"][0]
            if choice.get("delta", {}).get("content"):
                t_last = time.perf_counter()
                t_first = t_first or t_last
                deltas += 1  # one delta per token, except bytes of a split UTF-8 character held back and merged
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        return {"t_send": t_send, "t_first": t_first, "t_last": t_last, "completion_tokens": deltas,
                "finish_reason": finish}

    stream([{"role": "user", "content": "Say hello."}], 8)  # warm-up
    decode = []
    for messages in spec["decode_messages"]:
        r = stream(messages, spec["decode_tokens"])
        decode.append(decode_row(r))
    ttft = []
    for messages, n_prompt in zip(spec["ttft_messages"], spec["ttft_prompt_tokens"], strict=True):
        r = stream(messages, 1)
        t = (r["t_first"] or r["t_last"] or time.perf_counter()) - r["t_send"]
        ttft.append({"prompt_tokens": n_prompt, "ttft_s": t, "pp_tok_s": n_prompt / t})
    conc = {}
    for level, batches in spec["concurrency_messages"].items():
        if int(level) != 1:
            continue  # llama-cpp-python's Llama object decodes one sequence at a time
        runs = []
        for batch in batches:
            t0 = time.perf_counter()
            r = stream(batch[0], spec["concurrent_tokens"])
            wall = time.perf_counter() - t0
            runs.append({"concurrency": 1, "completion_tokens": r["completion_tokens"], "wall_s": wall,
                         "agg_tok_s": r["completion_tokens"] / wall, "short_streams": 0, "errors": 0})
        conc[level] = runs
    return {"load_s": load_s, "decode": decode, "ttft": ttft, "concurrency": conc}


def decode_row(r: dict[str, Any]) -> dict[str, Any]:
    span = (r["t_last"] - r["t_first"]) if r["t_first"] is not None and r["t_last"] is not None else 0.0
    n = r["completion_tokens"]
    tps = (n - 1) / span if span > 0 and n > 1 else float("nan")
    return {"completion_tokens": n, "finish_reason": r["finish_reason"], "decode_s": span, "decode_tok_s": tps,
            "ttft_s": (r["t_first"] or r["t_send"]) - r["t_send"]}


# -- transformers ----------------------------------------------------------------------------------------------
def run_transformers(spec: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype,
                                                              attn_implementation=spec["transformers_attn"]).eval()
    load_s = time.perf_counter() - t0
    pad_id = spec["pad_id"]

    class Clock(BaseStreamer):
        """Arrival time of each generated token: `generate` calls put() once with the prompt, then per token."""

        def __init__(self) -> None:
            self.seen_prompt = False
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(batch: list[list[int]], new_tokens: int, streamer: Clock | None = None) -> tuple[int, float]:
        width = max(len(ids) for ids in batch)
        # Left padding: decoder-only generation appends after the last column, so every row must end there.
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                                 streamer=streamer)
        wall = time.perf_counter() - t0
        return int(out[:, width:].numel()), wall

    generate([spec["warmup_ids"]], 8)
    decode = []
    for ids in spec["decode_ids"]:
        clock = Clock()
        t_send = time.perf_counter()
        n, _ = generate([ids], spec["decode_tokens"], clock)
        r = {"t_send": t_send, "t_first": clock.times[0] if clock.times else None,
             "t_last": clock.times[-1] if clock.times else None, "completion_tokens": n, "finish_reason": "length"}
        decode.append(decode_row(r))
    ttft = []
    for ids in spec["ttft_ids"]:
        _, wall = generate([ids], 1)
        ttft.append({"prompt_tokens": len(ids), "ttft_s": wall, "pp_tok_s": len(ids) / wall})
    conc = {}
    for level, batches in spec["concurrency_ids"].items():
        runs = []
        for batch in batches:
            n, wall = generate(batch, spec["concurrent_tokens"])
            runs.append({"concurrency": int(level), "completion_tokens": n, "wall_s": wall, "agg_tok_s": n / wall,
                         "short_streams": 0, "errors": 0})
        conc[level] = runs
    return {"load_s": load_s, "decode": decode, "ttft": ttft, "concurrency": conc}


def no_nan(x: Any) -> Any:
    """JSON has no NaN: a measurement that could not be taken is written as null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [no_nan(v) for v in x]
    return x


def main(argv: list[str]) -> int:
    if argv[:1] == ["llamacpp-server"]:
        llamacpp_options()
        sys.argv = ["llama_cpp.server", *argv[1:]]
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
        return 0
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    kind, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if kind == "llamacpp":
        result = run_llamacpp(spec)
    elif kind.startswith("transformers-"):
        result = run_transformers(spec, kind.removeprefix("transformers-"))
    else:
        print(f"unknown peer kind {kind!r}", file=sys.stderr)
        return 2
    Path(out_path).write_text(json.dumps(no_nan(result), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
