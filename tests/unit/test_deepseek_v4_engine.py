"""DeepSeek-V4 in the engine, on the tiny official-format checkpoint: the engine's greedy tokens are the
model's own (chunked prefill, continuous batching with other requests), prefix-cache hits reuse whole
128-token units (and only those) with the same tokens as a cold run, and finished or aborted requests
leave no state behind."""

from __future__ import annotations

import pytest
import torch

from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.request import SamplingParams
from flashserve.engine.state_runner import SequenceStateRunner
from flashserve.models.deepseek_v4 import DeepseekV4ForCausalLM
from flashserve.models.loading import Checkpoint, load_checkpoint
from flashserve.models.registry import build_model
from flashserve.models.tiny_v4 import make_tiny_v4

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return load_checkpoint(make_tiny_v4(tmp_path_factory.mktemp("tiny-v4"), seed=3))


@pytest.fixture(scope="module")
def model(checkpoint: Checkpoint) -> DeepseekV4ForCausalLM:
    built = build_model(checkpoint)
    assert isinstance(built, DeepseekV4ForCausalLM)
    return built


def engine(model: DeepseekV4ForCausalLM, budget: int = 64, prefix_caching: bool = True) -> LLMEngine:
    config = EngineConfig(max_model_len=1024, num_kv_blocks=64, block_size=model.prefix_unit,
                          max_num_batched_tokens=budget, enable_prefix_caching=prefix_caching)
    return LLMEngine(model, config, model.config.vocab_size)


def run(eng: LLMEngine, prompts: dict[str, list[int]]) -> tuple[dict[str, list[int]], dict[str, int]]:
    for rid, ids in prompts.items():
        eng.add_request(rid, ids, GREEDY)
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    cached: dict[str, int] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens[out.request_id].extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
    return tokens, cached


def reference(model: DeepseekV4ForCausalLM, prompt: list[int], n: int = 12) -> list[int]:
    state = model.new_state()
    logits = model(torch.tensor(prompt), state, last_only=True)
    out: list[int] = []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = model(torch.tensor(out[-1:]), state, last_only=True)
    return out


def prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(8, 512, (length,), generator=g).tolist()


def test_engine_tokens_are_the_models_own(model: DeepseekV4ForCausalLM) -> None:
    p = prompt(0, 150)  # longer than the 64-token budget: prefill in chunks, across a unit boundary
    tokens, cached = run(engine(model), {"a": p})
    assert tokens["a"] == reference(model, p) and cached["a"] == 0


def test_batching_does_not_change_a_requests_tokens(model: DeepseekV4ForCausalLM) -> None:
    prompts = {f"r{i}": prompt(10 + i, n) for i, n in enumerate((5, 40, 131, 77))}
    together, _ = run(engine(model), prompts)
    for rid, p in prompts.items():
        assert together[rid] == reference(model, p), rid


def test_prefix_cache_reuses_whole_units_only(model: DeepseekV4ForCausalLM) -> None:
    eng = engine(model)
    shared = prompt(20, 300)
    first, cached_first = run(eng, {"cold": shared})
    assert cached_first["cold"] == 0
    follow = shared[:290] + prompt(21, 30)  # shares 290 tokens: two whole units of 128, not a third
    second, cached = run(eng, {"warm": follow})
    assert cached["warm"] == 256
    assert second["warm"] == reference(model, follow)
    assert isinstance(eng.runner, SequenceStateRunner) and eng.runner.recomputed_prefixes == 0
    again, cached_again = run(eng, {"again": list(shared)})
    assert cached_again["again"] == 256 and again["again"] == first["cold"]  # 299 tokens: 2 whole units
    salted = eng.add_request("salted", list(shared), GREEDY, cache_salt="other-tenant")
    while eng.has_unfinished_requests():
        eng.step()
    assert salted.num_cached_tokens == 0  # another tenant's prefix is never reused


def test_a_dropped_prefix_copy_is_recomputed_to_the_same_tokens(model: DeepseekV4ForCausalLM) -> None:
    eng = engine(model)
    shared = prompt(30, 200)
    run(eng, {"cold": shared})
    assert isinstance(eng.runner, SequenceStateRunner)
    eng.runner.snapshots.clear()
    tokens, cached = run(eng, {"warm": shared[:150] + [9, 10]})
    assert cached["warm"] == 128 and eng.runner.recomputed_prefixes == 1
    assert tokens["warm"] == reference(model, shared[:150] + [9, 10])


def test_finished_and_aborted_requests_leave_no_state(model: DeepseekV4ForCausalLM) -> None:
    eng = engine(model)
    run(eng, {"done": prompt(40, 20)})
    eng.add_request("gone", prompt(41, 20), GREEDY)
    eng.step()
    assert isinstance(eng.runner, SequenceStateRunner) and "gone" in eng.runner.states
    eng.abort_request("gone")
    assert eng.runner.states == {} and not eng.has_unfinished_requests()

