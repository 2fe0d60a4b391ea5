"""The engine end to end on a weightless model whose next token is checkable arithmetic."""

from __future__ import annotations

import pytest

from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.request import FinishReason, SamplingParams
from tests.unit.fake_model import VOCAB, CountingModel, expected_next


def make_engine(num_blocks: int = 64, block_size: int = 4, max_len: int = 64, budget: int = 32,
                prefix: bool = True) -> LLMEngine:
    config = EngineConfig(max_model_len=max_len, num_kv_blocks=num_blocks, block_size=block_size,
                          max_num_batched_tokens=budget, enable_prefix_caching=prefix)
    return LLMEngine(CountingModel(), config, VOCAB)


def greedy(max_tokens: int, stop: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=stop)


def reference(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(expected_next(tokens))
    return tokens[len(prompt):]


def run_all(engine: LLMEngine) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return outputs


def test_single_request_follows_the_model() -> None:
    engine = make_engine()
    engine.add_request("a", [3, 1, 4, 1, 5], greedy(6))
    assert run_all(engine)["a"] == reference([3, 1, 4, 1, 5], 6)


def test_concurrent_requests_decode_together_and_match_solo_runs() -> None:
    engine = make_engine()
    prompts = {f"r{i}": [i + 1] * (3 + 5 * i) for i in range(5)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy(7))
    outputs = run_all(engine)
    for rid, prompt in prompts.items():
        assert outputs[rid] == reference(prompt, 7)
    # Batched: far fewer forward passes than one per token per request.
    assert len(engine.model.forward_calls) < 5 * 7
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_requests_join_mid_flight() -> None:
    engine = make_engine()
    engine.add_request("a", [1, 2, 3], greedy(10))
    seen: dict[str, list[int]] = {}
    for step in range(40):
        if step == 3:
            engine.add_request("b", [7, 7, 7, 7, 7], greedy(4))
        for out in engine.step():
            seen.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert seen["a"] == reference([1, 2, 3], 10)
    assert seen["b"] == reference([7] * 5, 4)


def test_prefix_cache_hit_is_reported_and_gives_the_same_tokens() -> None:
    engine = make_engine()
    prompt = list(range(1, 23))
    engine.add_request("a", prompt, greedy(3))
    first = run_all(engine)["a"]
    engine.add_request("b", prompt, greedy(3))
    outs: list = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    assert [t for o in outs for t in o.new_token_ids] == first
    assert outs[-1].num_cached_tokens == 20  # 5 full blocks of 4; the last token is recomputed


def test_preemption_under_memory_pressure_keeps_outputs_exact() -> None:
    engine = make_engine(num_blocks=16, block_size=4, max_len=64, prefix=False)
    prompts = {f"r{i}": [i + 2] * 10 for i in range(4)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy(20))
    outputs = run_all(engine)
    for rid, prompt in prompts.items():
        assert outputs[rid] == reference(prompt, 20)
    assert engine.kv.num_free_blocks == 16


def test_max_tokens_is_clamped_to_the_context() -> None:
    engine = make_engine(max_len=16)
    request = engine.add_request("a", list(range(10)), greedy(384_000))
    assert request.max_output_tokens == 6
    outputs = run_all(engine)
    assert len(outputs["a"]) == 6 and request.finish_reason is FinishReason.LENGTH


def test_prompt_filling_the_context_is_refused() -> None:
    engine = make_engine(max_len=16)
    with pytest.raises(ValueError):
        engine.add_request("a", list(range(16)), greedy(1))


def test_stop_token_ends_the_request() -> None:
    engine = make_engine()
    prompt = [1, 2, 3]
    stop = reference(prompt, 3)[2]
    request = engine.add_request("a", prompt, greedy(50, stop=(stop,)))
    assert run_all(engine)["a"] == reference(prompt, 3)
    assert request.finish_reason is FinishReason.STOP


def test_abort_frees_blocks() -> None:
    engine = make_engine()
    engine.add_request("a", list(range(30)), greedy(50))
    engine.step()
    final = engine.abort_request("a")
    assert final is not None and final.finished and final.finish_reason is FinishReason.ABORT
    assert engine.abort_request("a") is None
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.check_invariants()
