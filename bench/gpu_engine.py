"""Engine throughput on a CUDA GPU: the figures issue 5 asks to record apart from the CPU comparison.

The 98 MB GGUF cannot travel to the lent GPU machine (its copy limit is 64 MiB) and that machine has no
network, so this builds the Llama model with SmolLM2-135M's exact shapes and random weights: speed does
not depend on the values. It drives `LLMEngine` in-process (no HTTP: the GPU image lacks the server's
dependencies), greedy with EOS ignored, and prints:

* single-stream decode tok/s over 128 tokens after a short prompt;
* prompt tok/s of a 500-token prompt (time to its first token);
* aggregate tok/s of 8 and 32 concurrent requests of 128 tokens.

It runs the engine as it is, eagerly: attention falls back to per-request SDPA on CUDA (the native kernels
are CPU code) and decode is not captured in CUDA graphs.

    python3 bench/gpu_engine.py [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.request import SamplingParams
from flashserve.models.llama import LlamaConfig, LlamaForCausalLM

SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                           rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)


def build(device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(SMOLLM2_135M)
    for param in model.parameters():
        param.data = (param.data * 0.02).to(dtype)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.pack("none", dtype)
    return model.eval().requires_grad_(False)


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(seconds to the first step's end, seconds of the remaining steps)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", prompt,
                           SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    engine.step()
    _sync(engine)
    first = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    _sync(engine)
    return first - start, time.perf_counter() - first


def _sync(engine: LLMEngine) -> None:
    if engine.config.device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args.device, dtype)
    engine = LLMEngine(model, EngineConfig(max_model_len=8192, num_kv_blocks=4096, dtype=dtype, device=args.device),
                       SMOLLM2_135M.vocab_size)
    short = [[1, 9690, 198, 2683, 253, 1345, 2] * 4]
    run(engine, short, 16)  # warm-up: kernels, allocator
    _, rest = run(engine, short, 128)
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
               "torch": torch.__version__, "dtype": args.dtype,
               "decode_tok_s": round(127 / rest, 1)}
    ttft, _ = run(engine, [[(7 * j) % 40000 + 100 for j in range(500)]], 1)
    results["prompt_tok_s"] = round(500 / ttft, 1)
    for clients in (8, 32):
        prompts = [[(11 * j + c) % 40000 + 100 for j in range(24)] for c in range(clients)]
        first, rest = run(engine, prompts, 128)
        results[f"aggregate_tok_s_{clients}"] = round(clients * 128 / (first + rest), 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
