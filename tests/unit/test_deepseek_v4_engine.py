"""DeepSeek-V4 in the engine, on the tiny official-format checkpoint: the engine's greedy tokens are the
model's own (chunked prefill, continuous batching with other requests), prefix-cache hits reuse whole
128-token units (and only those) with the same tokens as a cold run, `cached_tokens` counts only tokens
whose state copy was resumed (a recomputed prefix is billed as a miss), the copies stay within their byte
bound, and finished or aborted requests leave no state behind."""

from __future__ import annotations

import pytest
import torch

from flashserve.engine.engine import EngineConfig, LLMEngine
from flashserve.engine.request import Request, SamplingParams
from flashserve.engine.state_runner import SequenceStateRunner, SnapshotPool
from flashserve.models.deepseek_v4 import DeepseekV4ForCausalLM
from flashserve.models.loading import Checkpoint, load_checkpoint
from flashserve.models.registry import MemorySetting, build_model, model_family
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


def engine(model: DeepseekV4ForCausalLM, budget: int = 64, prefix_caching: bool = True,
           snapshot_bytes: int | None = None) -> LLMEngine:
    config = EngineConfig(max_model_len=1024, num_kv_blocks=64, block_size=128, max_num_batched_tokens=budget,
                          enable_prefix_caching=prefix_caching, snapshot_bytes=snapshot_bytes)
    return LLMEngine(model, config, model.config.vocab_size, runner="sequence_state")


def pool(eng: LLMEngine) -> SnapshotPool:
    assert isinstance(eng.runner, SequenceStateRunner)
    return eng.runner.pool


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
    pool(eng).check_invariants()
    again, cached_again = run(eng, {"again": list(shared)})
    assert cached_again["again"] == 256 and again["again"] == first["cold"]  # 299 tokens: 2 whole units
    salted = eng.add_request("salted", list(shared), GREEDY, cache_salt="other-tenant")
    while eng.has_unfinished_requests():
        eng.step()
    assert salted.num_cached_tokens == 0  # another tenant's prefix is never reused


def test_a_dropped_prefix_copy_is_a_miss_not_a_billed_hit(model: DeepseekV4ForCausalLM) -> None:
    eng = engine(model)
    shared = prompt(30, 300)
    run(eng, {"cold": shared})
    pool(eng).clear()  # every copy gone: the KV manager's blocks no longer count as hits
    follow = shared[:290] + [9, 10]
    tokens, cached = run(eng, {"warm": follow})
    assert cached["warm"] == 0  # all 292 tokens recomputed: none billed at the cache-hit price
    assert tokens["warm"] == reference(model, follow)
    assert eng.runner.stats()["recomputed_prefixes"] == 0  # the hit was cut at admission, not at the run


def test_a_hit_is_cut_to_the_deepest_copy_left(model: DeepseekV4ForCausalLM) -> None:
    eng = engine(model)
    shared = prompt(31, 300)
    run(eng, {"cold": shared})
    second_unit = eng.runner._key(_request(shared), 256)  # type: ignore[attr-defined]
    pool(eng).discard(second_unit)  # the copy after 256 tokens is gone, the one after 128 is kept
    follow = shared[:290] + [9, 10]
    tokens, cached = run(eng, {"warm": follow})
    assert cached["warm"] == 128 and tokens["warm"] == reference(model, follow)


def test_a_copy_gone_by_the_run_bills_only_what_was_resumed(model: DeepseekV4ForCausalLM) -> None:
    """Should the KV manager admit a hit whose copy is gone by the time the request runs, the runner resumes
    from the longest copy left, recomputes the rest and lowers `cached_tokens` to what it resumed."""
    eng = engine(model)
    shared = prompt(32, 300)
    run(eng, {"cold": shared})
    eng.kv.prefix_store = None  # the KV manager no longer consults the pool: it admits every cached block
    pool(eng).discard(eng.runner._key(_request(shared), 256))  # type: ignore[attr-defined]
    follow = shared[:290] + [9, 10]
    tokens, cached = run(eng, {"warm": follow})
    assert cached["warm"] == 128  # admitted with 256, resumed from 128: billed 128
    assert eng.runner.stats()["recomputed_prefixes"] == 1
    assert tokens["warm"] == reference(model, follow)


def test_prefix_copies_stay_within_their_byte_bound(model: DeepseekV4ForCausalLM) -> None:
    unbounded = engine(model)
    run(unbounded, {"cold": prompt(33, 520)})  # four whole units: four copies
    assert len(pool(unbounded)) == 4
    full = pool(unbounded).used_bytes
    bound = full * 3 // 4
    eng = engine(model, snapshot_bytes=bound)
    shared = prompt(33, 520)
    run(eng, {"cold": shared})
    p = pool(eng)
    p.check_invariants()
    assert 0 < len(p) < 4 and p.used_bytes <= bound
    # The oldest (shortest) copies went first; the newest, after all four units, still serves the whole hit.
    tokens, cached = run(eng, {"warm": shared[:-1]})
    assert cached["warm"] == 512 and tokens["warm"] == reference(model, shared[:-1])
    p.check_invariants()
    eng.kv.check_invariants()


def test_the_family_sizes_the_pool_from_the_memory_setting(model: DeepseekV4ForCausalLM) -> None:
    family = model_family("deepseek_v4")
    plan = family.memory(model, MemorySetting(kv_cache_tokens=1024, max_model_len=1024, block_size=16,
                                              kv_cache_dtype=torch.bfloat16))
    assert plan.block_size == 128 and plan.num_blocks == 8
    assert plan.snapshot_bytes == 1024 * model.snapshot_bytes_per_token()
    config = EngineConfig(max_model_len=1024, num_kv_blocks=plan.num_blocks, block_size=plan.block_size,
                          max_num_batched_tokens=64, snapshot_bytes=plan.snapshot_bytes)
    eng = LLMEngine(model, config, model.config.vocab_size, runner=family.runner)
    run(eng, {"cold": prompt(35, 520)})
    assert len(pool(eng)) == 4 and pool(eng).used_bytes <= plan.snapshot_bytes  # 1024 tokens hold 512 cached


def test_no_prefix_caching_keeps_no_copies(model: DeepseekV4ForCausalLM) -> None:
    eng = engine(model, prefix_caching=False)
    run(eng, {"a": prompt(34, 300)})
    assert len(pool(eng)) == 0 and pool(eng).used_bytes == 0


def _request(tokens: list[int]) -> Request:
    return Request("probe", list(tokens), GREEDY, max_output_tokens=1)


def test_finished_and_aborted_requests_leave_no_state(model: DeepseekV4ForCausalLM) -> None:
    eng = engine(model)
    run(eng, {"done": prompt(40, 20)})
    eng.add_request("gone", prompt(41, 20), GREEDY)
    eng.step()
    assert isinstance(eng.runner, SequenceStateRunner) and "gone" in eng.runner.states
    eng.abort_request("gone")
    assert eng.runner.states == {} and not eng.has_unfinished_requests()

