"""Output quality of the serving configurations against the float32 reference, on a fixed prompt set.

Runs the embedded model in-process through the engine (no HTTP) once per configuration, greedy, and
compares each answer with the float32 / unquantized one: how many are identical token for token, the
first token where each one departs, and whether the answers the foundation's tests check are still right
("Paris", "4", "Shakespeare"). The quantizations behind each configuration are described in the README.

    .venv/bin/python bench/quality.py [--configs float32/bfloat16:int4,float32/bfloat16:none,...]
                                      [--max-tokens 48]

A configuration is ACTIVATIONS/WEIGHTS:DECODE_QUANT, as the settings `dtype`, `weight_dtype` and
`weight_quant`; the reference is float32/float32:none, the exact dequantized checkpoint.

Writes bench/results/quality-<UTC date>.json. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.request import SamplingParams
from flashserve.models.loading import Checkpoint, embedded_model_path, load_checkpoint
from flashserve.models.registry import build_model
from flashserve.models.tokenizer import encode

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# (question, a word a right answer contains, or None where only sameness with float32 is measured)
PROMPTS: list[tuple[str, str | None]] = [
    ("What is the capital of France?", "Paris"),
    ("What is 2 + 2?", "4"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the capital of Japan?", "Tokyo"),
    ("How many days are there in a week?", "7"),
    ("What is the chemical symbol for water?", "H2O"),
    ("Name the largest planet in the solar system.", None),
    ("What color is the sky on a clear day?", None),
    ("Write a haiku about autumn.", None),
    ("Explain in one sentence what a CPU does.", None),
    ("Write a Python function that returns the n-th Fibonacci number.", None),
    ("Translate 'thank you' into Spanish.", None),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def generate(checkpoint: Checkpoint, dtype: torch.dtype, weight_dtype: torch.dtype, weight_quant: str,
             max_tokens: int) -> list[list[int]]:
    model = build_model(checkpoint, dtype, weight_quant, weight_dtype)
    # The reference keeps its cache in float32; every other configuration uses the server's default bf16 cache.
    exact = dtype == weight_dtype == torch.float32 and weight_quant == "none"
    engine = LLMEngine(model, EngineConfig(max_model_len=2048, num_kv_blocks=512, dtype=dtype,
                                           kv_cache_dtype=torch.float32 if exact else torch.bfloat16),
                       int(checkpoint.config["vocab_size"]))
    answers: list[list[int]] = []
    for i, (question, _) in enumerate(PROMPTS):
        text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                "<|im_start|>assistant\n")
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                stop_token_ids=tuple(checkpoint.stop_token_ids))
        engine.add_request(str(i), encode(checkpoint.tokenizer, text), params)
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
        answers.append(tokens)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="float32/bfloat16:int4,float32/bfloat16:int8,float32/bfloat16:none,"
                                             "float32/float32:int4,bfloat16/bfloat16:none")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    checkpoints: dict[torch.dtype, Checkpoint] = {}
    reference: list[list[int]] | None = None
    rows = []
    reference_config = "float32/float32:none"
    for config in [reference_config, *[c for c in args.configs.split(",") if c != reference_config]]:
        dtypes, quant = config.split(":")
        dtype, weight_dtype = (DTYPES[d] for d in dtypes.split("/"))
        if dtype not in checkpoints:
            checkpoints[dtype] = load_checkpoint(embedded_model_path(), dtype)
        checkpoint = checkpoints[dtype]
        answers = generate(checkpoint, dtype, weight_dtype, quant, args.max_tokens)
        reference = reference or answers
        texts = [checkpoint.tokenizer.decode(a) for a in answers]
        departs = [next((k for k, (x, y) in enumerate(zip(a, r, strict=False)) if x != y),
                        None if a == r else min(len(a), len(r))) for a, r in zip(answers, reference, strict=True)]
        right = [None if want is None else want.lower() in text.lower()
                 for (_, want), text in zip(PROMPTS, texts, strict=True)]
        row = {
            "config": config,
            "identical_to_float32": sum(d is None for d in departs),
            "prompts": len(PROMPTS),
            "first_departure_token": departs,
            "checked_answers_right": sum(bool(r) for r in right if r is not None),
            "checked_answers": sum(r is not None for r in right),
            "answers": texts,
        }
        rows.append(row)
        print(f"{config:22} identical to float32: {row['identical_to_float32']}/{len(PROMPTS)}  "
              f"checked answers right: {row['checked_answers_right']}/{row['checked_answers']}  "
              f"first departures: {[d for d in departs if d is not None]}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"quality-{dt.datetime.now(dt.UTC).date()}.json"
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "machine": platform.processor(),
                               "torch": torch.__version__, "max_tokens": args.max_tokens, "results": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
