"""Continuous batching decisions, without a model."""

from __future__ import annotations

from flashserve.engine.kv_cache import KVCacheManager
from flashserve.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from flashserve.engine.scheduler import Scheduler, SchedulerConfig


def make(rid: str, n_prompt: int, max_out: int = 4) -> Request:
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(temperature=0, stop_token_ids=(0,)),
                   max_output_tokens=max_out)


def run_step(s: Scheduler, token: int = 5) -> tuple[list[tuple[str, int]], dict[str, int]]:
    out = s.schedule()
    sampled = {r.request_id: token for r in out.sampling_requests}
    s.update(out, sampled)
    return [(c.request.request_id, c.num_new_tokens) for c in out.chunks], sampled


def test_long_prompt_is_chunked_to_the_budget() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16), KVCacheManager(64, 4))
    s.add(make("a", 40))
    assert run_step(s) == ([("a", 16)], {})
    assert run_step(s) == ([("a", 16)], {})
    assert run_step(s) == ([("a", 8)], {"a": 5})
    assert run_step(s)[0] == [("a", 1)]


def test_decodes_go_first_and_new_requests_share_the_step() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=10), KVCacheManager(64, 4))
    s.add(make("a", 6))
    run_step(s)
    s.add(make("b", 20))
    chunks, _ = run_step(s)
    assert chunks == [("a", 1), ("b", 9)]


def test_max_num_seqs_bounds_the_batch() -> None:
    s = Scheduler(SchedulerConfig(max_num_seqs=2), KVCacheManager(64, 4))
    for rid in "abc":
        s.add(make(rid, 3))
    chunks, _ = run_step(s)
    assert [rid for rid, _ in chunks] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_requests_leave_when_finished_and_others_join() -> None:
    s = Scheduler(SchedulerConfig(), KVCacheManager(64, 4))
    s.add(make("a", 3, max_out=1))
    s.add(make("b", 3, max_out=3))
    run_step(s)  # a finishes at once (max 1 token)
    assert [r.request_id for r in s.running] == ["b"]
    s.add(make("c", 2))
    chunks, _ = run_step(s)
    assert chunks == [("b", 1), ("c", 2)]


def test_stop_token_and_length_finish() -> None:
    s = Scheduler(SchedulerConfig(), KVCacheManager(64, 4))
    a, b = make("a", 3, max_out=10), make("b", 3, max_out=2)
    s.add(a)
    s.add(b)
    out = s.schedule()
    s.update(out, {"a": 0, "b": 7})
    assert a.finish_reason is FinishReason.STOP
    out = s.schedule()
    s.update(out, {"b": 7})
    assert b.finish_reason is FinishReason.LENGTH
    assert not s.has_unfinished()
    s.kv.check_invariants()
    assert s.kv.num_free_blocks == 64


def test_context_end_finishes_with_length() -> None:
    s = Scheduler(SchedulerConfig(max_model_len=8), KVCacheManager(64, 4))
    r = make("a", 6, max_out=100)
    s.add(r)
    run_step(s)
    run_step(s)
    assert r.finish_reason is FinishReason.LENGTH and r.num_tokens == 8


def test_newest_request_is_preempted_when_blocks_run_out() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(), kv)
    old, new = make("old", 8, max_out=20), make("new", 8, max_out=20)
    s.add(old)
    s.add(new)
    run_step(s)  # both prefilled: 2 blocks each, pool full
    _, sampled = run_step(s)  # both need a third block for position 8
    assert new.status is RequestStatus.WAITING and new.num_preemptions == 1
    assert new.block_ids == [] and new.num_computed_tokens == 0
    assert old.status is RequestStatus.RUNNING and "old" in sampled
    kv.check_invariants()


def test_abort_frees_blocks_and_is_idempotent() -> None:
    kv = KVCacheManager(16, 4)
    s = Scheduler(SchedulerConfig(), kv)
    r = make("a", 9)
    s.add(r)
    run_step(s)
    assert s.abort("a") is r and r.finish_reason is FinishReason.ABORT
    assert s.abort("a") is None
    assert kv.num_free_blocks == 16
    kv.check_invariants()
