"""What one request's logprobs cost the other requests of its batch, on the embedded model in-process.

A batch of `--batch` greedy requests decodes `--tokens` tokens each (EOS ignored, after short prompts),
with the server's default precision (int4 decode weights and head, top-8 float32 rescoring, bf16 KV cache).
It runs twice, interleaved `--rounds` times: with no request asking for logprobs, and with one of them
asking for logprobs with top_logprobs=20 (the full float32 head for that one row per step:
engine/logprobs.py). The figure is the decode step time (median over steps of the rounds' medians), which
is what every other request of the batch waits for per token, and the relative change.

    PYTHONPATH=$PWD .venv/bin/python bench/logprobs_batch.py [--batch 8] [--tokens 32] [--rounds 3]

Prints the figure and the command; a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.request import SamplingParams
from flashserve.kernels import cpu_ops
from flashserve.models.loading import embedded_model_path, load_checkpoint
from flashserve.models.registry import build_model

PROMPTS = ["What is the capital of France?", "Name three colors.", "Count to five.", "Write a haiku about rain.",
           "Why is the sky blue?", "What is 2 + 2?", "Tell me a joke.", "Who wrote Hamlet?"]


def decode_step_times(engine: LLMEngine, prompts: list[list[int]], tokens: int, with_logprobs: bool) -> list[float]:
    for i, prompt in enumerate(prompts):
        wants = 20 if with_logprobs and i == 0 else None
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                                                           logprobs=wants))
    times: list[float] = []
    while engine.has_unfinished_requests():
        prefill = any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
            or bool(engine.scheduler.waiting)
        start = time.perf_counter()
        engine.step()
        if not prefill:  # a pure decode step: every request of the batch advances one token
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    checkpoint = load_checkpoint(embedded_model_path(), torch.float32)
    model = build_model(checkpoint, torch.float32, "int4", torch.bfloat16, consume=True)
    cpu_ops()
    config = EngineConfig(max_model_len=512, num_kv_blocks=512, block_size=16, max_num_seqs=args.batch,
                          max_num_batched_tokens=512, enable_prefix_caching=False, kv_cache_dtype=torch.bfloat16)
    engine = LLMEngine(model, config, int(checkpoint.config["vocab_size"]))
    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [checkpoint.tokenizer.encode(template.format(PROMPTS[i % len(PROMPTS)]), add_special_tokens=False).ids
               for i in range(args.batch)]
    decode_step_times(engine, prompts, 4, False)  # warm-up
    medians: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for with_logprobs in (False, True):
            medians[with_logprobs].append(statistics.median(
                decode_step_times(engine, prompts, args.tokens, with_logprobs)))
    base, with_lp = statistics.median(medians[False]), statistics.median(medians[True])
    print(f"command: PYTHONPATH=$PWD .venv/bin/python bench/logprobs_batch.py --batch {args.batch} "
          f"--tokens {args.tokens} --rounds {args.rounds}")
    rounds = {k: [round(m * 1e3, 2) for m in v] for k, v in medians.items()}
    print(f"threads: {torch.get_num_threads()}, rounds' medians (ms): none {rounds[False]}, "
          f"one with logprobs {rounds[True]}")
    print(f"decode step, batch of {args.batch}: {base * 1e3:.2f} ms with no logprobs, {with_lp * 1e3:.2f} ms with "
          f"one request asking top_logprobs=20: {100 * (with_lp / base - 1):+.1f}% for the other "
          f"{args.batch - 1} requests")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
