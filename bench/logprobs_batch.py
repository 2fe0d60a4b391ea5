"""What one request's logprobs cost the other requests of its batch, on the embedded model in-process.

A batch of `--batch` greedy requests decodes `--tokens` tokens each (EOS ignored, after short prompts),
with the server's default precision (int4 decode weights and head, top-8 float32 rescoring, bf16 KV cache).
It runs twice, interleaved `--rounds` times: with no request asking for logprobs, and with one of them
asking for logprobs with top_logprobs=20 (the full float32 head for that one row per step:
engine/logprobs.py). The figure is the decode step time, which is what every other request of the batch
waits for per token, and its relative change: the fastest step of each kind over all rounds (the minimum
is the estimate least disturbed by other processes on a shared machine; the medians are printed too), and
the added work measured alone: the fastest of 20 runs of the float32 head over one row plus its
log-softmax and top 20.

    PYTHONPATH=$PWD .venv/bin/python bench/logprobs_batch.py [--batch 8] [--tokens 32] [--rounds 3] [--float32-head]

Prints the figure and the command; a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.logprobs import sampled_logprobs
from flashserve.engine.request import SamplingParams
from flashserve.kernels import cpu_ops
from flashserve.models.loading import embedded_model_path, load_checkpoint
from flashserve.models.registry import build_model

PROMPTS = ["What is the capital of France?", "Name three colors.", "Count to five.", "Write a haiku about rain.",
           "Why is the sky blue?", "What is 2 + 2?", "Tell me a joke.", "Who wrote Hamlet?"]


def decode_step_times(engine: LLMEngine, prompts: list[list[int]], tokens: int,
                      with_logprobs: bool) -> tuple[list[float], list[float]]:
    """CPU and wall seconds of each pure decode step."""
    for i, prompt in enumerate(prompts):
        wants = 20 if with_logprobs and i == 0 else None
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                                                           logprobs=wants))
    cpu: list[float] = []
    wall: list[float] = []
    while engine.has_unfinished_requests():
        prefill = any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
            or bool(engine.scheduler.waiting)
        start, start_cpu = time.perf_counter(), time.process_time()
        engine.step()
        if not prefill:  # a pure decode step: every request of the batch advances one token
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start)
    return cpu, wall


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--float32-head", action="store_true",
                        help="read the exact head from its float32 table, not its Q8_0 codes (the cost before)")
    args = parser.parse_args()
    checkpoint = load_checkpoint(embedded_model_path(), torch.float32)
    model = build_model(checkpoint, torch.float32, "int4", torch.bfloat16, consume=True)
    cpu_ops()
    if args.float32_head:
        model.exact_head_q8 = None
    config = EngineConfig(max_model_len=512, num_kv_blocks=512, block_size=16, max_num_seqs=args.batch,
                          max_num_batched_tokens=512, enable_prefix_caching=False, kv_cache_dtype=torch.bfloat16)
    engine = LLMEngine(model, config, int(checkpoint.config["vocab_size"]))
    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompts = [checkpoint.tokenizer.encode(template.format(PROMPTS[i % len(PROMPTS)]), add_special_tokens=False).ids
               for i in range(args.batch)]
    decode_step_times(engine, prompts, 4, False)  # warm-up
    medians: dict[tuple[str, bool], list[float]] = {(k, w): [] for k in ("cpu", "wall") for w in (False, True)}
    fastest_steps: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for with_logprobs in (False, True):
            cpu, wall = decode_step_times(engine, prompts, args.tokens, with_logprobs)
            medians["cpu", with_logprobs].append(statistics.median(cpu))
            medians["wall", with_logprobs].append(statistics.median(wall))
            fastest_steps[with_logprobs] += wall
    hidden = torch.randn(1, model.config.hidden_size)
    extra = min(_timed(lambda: sampled_logprobs(model.exact_logits(hidden), [0], [20])) for _ in range(20))
    print(f"command: PYTHONPATH=$PWD .venv/bin/python bench/logprobs_batch.py --batch {args.batch} "
          f"--tokens {args.tokens} --rounds {args.rounds}{' --float32-head' if args.float32_head else ''}   "
          f"(torch threads: {torch.get_num_threads()}; exact head read from "
          f"{'int8 codes' if model.exact_head_q8 is not None else 'float32'})")
    fastest = {w: min(fastest_steps[w]) for w in (False, True)}
    print(f"fastest decode step, batch of {args.batch}: {fastest[False] * 1e3:.1f} ms with no logprobs, "
          f"{fastest[True] * 1e3:.1f} ms with one request asking top_logprobs=20: "
          f"{100 * (fastest[True] / fastest[False] - 1):+.1f}% for the other {args.batch - 1} requests")
    print(f"the added work alone (float32 head over one row, log-softmax, top 20): {extra * 1e3:.1f} ms, "
          f"{100 * extra / fastest[False]:.1f}% of the fastest step without logprobs")
    for kind in ("cpu", "wall"):
        rounds = [[round(m * 1e3, 1) for m in medians[kind, w]] for w in (False, True)]
        print(f"  rounds' median step {kind} time (ms): no logprobs {rounds[0]}, one with logprobs {rounds[1]}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
