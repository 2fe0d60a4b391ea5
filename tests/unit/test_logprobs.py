"""Logprobs in the engine: exact float32 values against a reference computation, on the embedded SmolLM2
(served as by default: int4 decode weights, an int4 head whose top candidates are rescored in float32) and
on the tiny DeepSeek-V4 checkpoint; a request's tokens are the same with and without logprobs, and its
logprobs are the same alone and in a batch.

The reference is the float32 head over the hidden state the model gave the head (recorded from the run),
in float64: `log_softmax(hidden @ W.T)`. The engine's float32 values must agree to float32 rounding: a
576-term float32 dot product of logits near 30 is good to about 1e-5 (measured up to 1.3e-5 on SmolLM2),
so TOL is 5e-5; the low-precision head alone misses by tenths (checked below).
"""

from __future__ import annotations

import pytest
import torch

from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.logprobs import SampledLogprob, sampled_logprobs
from flashserve.engine.request import SamplingParams, ThinkingControl
from flashserve.models.deepseek_v4 import DeepseekV4ForCausalLM
from flashserve.models.llama import LlamaForCausalLM
from flashserve.models.loading import Checkpoint, load_checkpoint
from flashserve.models.registry import build_model
from flashserve.models.tiny_v4 import make_tiny_v4

TOL = 5e-5  # float32 rounding of the head's dot products and the normalizer (see the docstring)


@pytest.fixture(scope="module")
def llama(smollm: Checkpoint) -> LlamaForCausalLM:
    model = build_model(smollm, torch.float32, "int4", torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and model.exact_head is not None
    return model


def llama_engine(model: LlamaForCausalLM) -> LLMEngine:
    config = EngineConfig(max_model_len=256, num_kv_blocks=64, block_size=16, max_num_batched_tokens=128,
                          kv_cache_dtype=torch.bfloat16)
    return LLMEngine(model, config, model.config.vocab_size)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
        ) -> tuple[dict[str, list[int]], dict[str, list[SampledLogprob]]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    logprobs: dict[str, list[SampledLogprob]] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            logprobs[out.request_id].extend(out.logprobs)
    return tokens, logprobs


def prompt_ids(checkpoint: Checkpoint, text: str) -> list[int]:
    return checkpoint.tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                                       add_special_tokens=False).ids


def greedy(n: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, logprobs=logprobs, ignore_eos=True)


def sampled(n: int, seed: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.95, max_tokens=n, seed=seed, logprobs=logprobs,
                          presence_penalty=0.5, logit_bias={7: 3.0}, ignore_eos=True)


def check_against_reference(logprobs: list[SampledLogprob], tokens: list[int], reference: list[torch.Tensor],
                            k: int) -> None:
    """Each token's logprob and top-k against the reference log-softmax rows (float64)."""
    assert len(logprobs) == len(tokens) == len(reference)
    for lp, token, ref in zip(logprobs, tokens, reference, strict=True):
        assert lp.token_id == token
        assert abs(lp.logprob - float(ref[token])) <= TOL, (lp.logprob, float(ref[token]))
        assert len(lp.top) == k
        best = ref.topk(k)
        for (tid, value), ref_id, ref_value in zip(lp.top, best.indices.tolist(), best.values.tolist(), strict=True):
            assert abs(value - ref_value) <= TOL
            assert tid == ref_id or abs(float(ref[tid]) - ref_value) <= TOL  # only a float32 tie may swap
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)


def test_llama_logprobs_are_the_float32_heads(llama: LlamaForCausalLM, smollm: Checkpoint,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    hidden_rows: list[torch.Tensor] = []
    original = llama.exact_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        hidden_rows.extend(hidden.detach().clone())
        return original(hidden)

    monkeypatch.setattr(llama, "exact_logits", recording)
    p = prompt_ids(smollm, "What is the capital of France?")
    tokens, logprobs = run(llama_engine(llama), {"a": (p, greedy(12, logprobs=5))})
    weight = llama.exact_head.double()  # type: ignore[union-attr]
    reference = [torch.log_softmax(h.double() @ weight.T, dim=-1) for h in hidden_rows]
    check_against_reference(logprobs["a"], tokens["a"], reference, 5)
    # Greedy: the chosen token is the argmax, so its logprob is the largest of the top ones (the same bits).
    for lp in logprobs["a"]:
        assert lp.top[0] == (lp.token_id, lp.logprob)
    # The low-precision head's logits alone would not do: its normalizer is off by far more than TOL.
    coarse = llama.lm_head.forward(torch.stack(hidden_rows), len(hidden_rows)).float()
    off = (torch.log_softmax(coarse, -1).double() - torch.stack(reference)).gather(
        1, torch.tensor(tokens["a"]).unsqueeze(1)).abs().max()
    assert off > 100 * TOL


def test_llama_tokens_and_logprobs_do_not_depend_on_logprobs_or_the_batch(llama: LlamaForCausalLM,
                                                                         smollm: Checkpoint) -> None:
    prompts = {name: prompt_ids(smollm, text) for name, text in
               (("a", "Name three colors."), ("b", "Count to five."), ("c", "Write a haiku about rain."))}
    without, _ = run(llama_engine(llama), {"a": (prompts["a"], greedy(10)), "b": (prompts["b"], greedy(10)),
                                           "c": (prompts["c"], sampled(10, seed=5))})
    tokens, logprobs = run(llama_engine(llama), {"a": (prompts["a"], greedy(10, logprobs=3)),
                                                 "b": (prompts["b"], greedy(10)),
                                                 "c": (prompts["c"], sampled(10, seed=5, logprobs=20))})
    assert tokens == without
    assert logprobs["b"] == [] and len(logprobs["a"]) == len(logprobs["c"]) == 10
    assert all(len(lp.top) == 20 for lp in logprobs["c"])
    alone_tokens, alone = run(llama_engine(llama), {"a": (prompts["a"], greedy(10, logprobs=3))})
    assert alone_tokens["a"] == tokens["a"] and alone["a"] == logprobs["a"]  # bit for bit


@pytest.fixture(scope="module")
def v4(tmp_path_factory: pytest.TempPathFactory) -> DeepseekV4ForCausalLM:
    model = build_model(load_checkpoint(make_tiny_v4(tmp_path_factory.mktemp("tiny-v4"), seed=3)))
    assert isinstance(model, DeepseekV4ForCausalLM)
    return model


def test_v4_logprobs_are_the_float32_heads(v4: DeepseekV4ForCausalLM) -> None:
    config = EngineConfig(max_model_len=1024, num_kv_blocks=64, block_size=128, max_num_batched_tokens=64)
    engine = LLMEngine(v4, config, v4.config.vocab_size, runner="sequence_state")
    g = torch.Generator().manual_seed(1)
    p = torch.randint(8, 512, (90,), generator=g).tolist()
    other = torch.randint(8, 512, (40,), generator=g).tolist()
    tokens, logprobs = run(engine, {"a": (p, greedy(8, logprobs=4)), "b": (other, greedy(8))})
    # Reference: the model's float32 head over its own hidden state, one token at a time, in float64.
    state = v4.new_state()
    streams = v4.streams(torch.tensor(p), state)
    reference = []
    for token in tokens["a"]:
        hidden = v4.norm(v4._collapse(streams[-1:], v4))
        reference.append(torch.log_softmax(hidden.double() @ v4.head.weight.double().T, dim=-1)[0])
        streams = v4.streams(torch.tensor([token]), state)
    check_against_reference(logprobs["a"], tokens["a"], reference, 4)
    for lp in logprobs["a"]:
        assert lp.top[0] == (lp.token_id, lp.logprob)
    assert logprobs["b"] == []


def test_sampled_logprobs_sort_ties_by_id() -> None:
    exact = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    [lp] = sampled_logprobs(exact, [4], [3])
    assert [tid for tid, _ in lp.top] == [1, 2, 4]
    assert lp.logprob == lp.top[2][1]
    assert sampled_logprobs(exact, [0], [0])[0].top == ()


def test_thinking_tokens_get_no_logprobs(v4: DeepseekV4ForCausalLM) -> None:
    """Logprobs cover content tokens: while a request thinks (its budget forces the end marker here) the
    engine computes none; from its first answer token on, each token has one."""
    config = EngineConfig(max_model_len=1024, num_kv_blocks=64, block_size=128, max_num_batched_tokens=64)
    engine = LLMEngine(v4, config, v4.config.vocab_size, runner="sequence_state")
    p = torch.randint(8, 512, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    engine.add_request("t", p, greedy(10, logprobs=2), thinking=ThinkingControl((7,), budget=4))
    seen: list[tuple[int, int, int]] = []  # (output index, reasoning tokens so far, logprobs)
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append((out.num_output_tokens - 1, out.num_reasoning_tokens, len(out.logprobs)))
    reasoning = seen[-1][1]
    assert 0 < reasoning < 10
    assert [n for i, _, n in seen if i < reasoning] == [0] * reasoning
    assert [n for i, _, n in seen if i >= reasoning] == [1] * (10 - reasoning)
