"""DeepSeek-V4 speed on this machine: a tiny and a mid-size random config, through `LLMEngine` in-process.

The real Flash weights (284B) cannot run here, so speed is measured on random weights of the architecture
(speed does not depend on the values). Each config is built with `tiny_v4.random_model` (every layer kind:
sliding, CSA with its indexer, HCA; hash and learned routing; mHC) and driven greedy with EOS ignored:

* prompt tok/s of a 512-token prompt (time to its first token);
* single-stream decode tok/s over 64 tokens;
* aggregate tok/s of 4 concurrent requests of 64 tokens after 64-token prompts.

    .venv/bin/python bench/v4_speed.py [--configs tiny,mid] [--device cpu] [--dtype float32]

Writes bench/results/v4-speed-<UTC time>.json. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.request import SamplingParams
from flashserve.models.deepseek_v4 import DeepseekV4Config, DeepseekV4ForCausalLM
from flashserve.models.registry import DEEPSEEK_V4
from flashserve.models.tiny_v4 import TINY_CONFIG, random_model

RESULTS = Path(__file__).resolve().parent / "results"

# Flash's shapes scaled down ~16x in width and ~5x in depth, with its layer pattern (2 sliding, then CSA
# and HCA alternating) and its ratios (4 and 128), window, indexer and routing fan-out.
MID_CONFIG: dict[str, Any] = {
    **TINY_CONFIG,
    "vocab_size": 32768, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "head_dim": 128,
    "qk_rope_head_dim": 32, "q_lora_rank": 256, "o_groups": 4, "o_lora_rank": 128, "sliding_window": 128,
    "compress_ratios": [0, 0, 4, 128, 4, 128, 4, 128, 0], "num_hash_layers": 3, "n_routed_experts": 32,
    "num_experts_per_tok": 6, "moe_intermediate_size": 256, "index_n_heads": 16, "index_head_dim": 64,
    "index_topk": 128, "max_position_embeddings": 8192,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 512, "beta_fast": 32,
                     "beta_slow": 1},
}
CONFIGS = {"tiny": TINY_CONFIG, "mid": MID_CONFIG}


def engine_for(model: DeepseekV4ForCausalLM, max_len: int) -> LLMEngine:
    config = EngineConfig(max_model_len=max_len, num_kv_blocks=max_len // model.prefix_unit * 8,
                          block_size=model.prefix_unit, max_num_batched_tokens=512)
    return LLMEngine(model, config, model.config.vocab_size, runner=DEEPSEEK_V4.runner)


def drain(engine: LLMEngine) -> tuple[float, dict[str, float]]:
    """Run to completion; returns the wall time and each request's time to its first token."""
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - t0
    return time.perf_counter() - t0, first


def measure(name: str, raw: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    cfg = DeepseekV4Config.from_hf(raw)
    model = random_model(cfg, seed=0).to(dtype)
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(8, cfg.vocab_size, (n,), generator=g).tolist()

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    engine = engine_for(model, 4096)
    engine.add_request("warm", prompt(32), params(4))
    drain(engine)

    engine.add_request("prefill", prompt(512), params(1))
    _, first = drain(engine)
    prefill = 512 / first["prefill"]

    engine.add_request("decode", prompt(16), params(64))
    t0 = time.perf_counter()
    stamps: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            stamps.extend(time.perf_counter() - t0 for _ in out.new_token_ids)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])

    for i in range(4):
        engine.add_request(f"c{i}", prompt(64), params(64))
    wall, _ = drain(engine)
    concurrent = 4 * 64 / wall
    params_count = sum(p.numel() for p in model.parameters())
    row = {"config": name, "parameters": params_count, "dtype": str(dtype).removeprefix("torch."),
           "prompt_tok_s_512": prefill, "decode_tok_s": decode, "aggregate_tok_s_4_clients": concurrent}
    print(f"{name:5} {params_count / 1e6:8.1f}M params  prompt {prefill:8.1f} tok/s  decode {decode:7.1f} tok/s  "
          f"4 clients {concurrent:7.1f} tok/s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    rows = [measure(name, CONFIGS[name], dtype) for name in args.configs.split(",")]
    now = dt.datetime.now(dt.UTC)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"v4-speed-{now.strftime('%Y-%m-%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]), "machine": platform.processor(),
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "timestamp_utc": now.isoformat(timespec="seconds"), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
