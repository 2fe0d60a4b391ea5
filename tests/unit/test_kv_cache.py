"""Block pool and prefix cache: invariants, sharing, isolation, eviction."""

from __future__ import annotations

from flashserve.engine.kv_cache import KVCacheManager
from flashserve.engine.request import Request, SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], salt: str = "") -> Request:
    return Request(rid, tokens, SamplingParams(temperature=0), max_output_tokens=8, cache_salt=salt)


def admit(kv: KVCacheManager, req: Request) -> int:
    """Allocate like the scheduler does; returns the number of cached tokens."""
    prefix = kv.find_cached_prefix(req)
    cached = len(prefix) * BS
    assert kv.allocate(req, req.num_tokens - cached, prefix)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)
    return cached


def test_allocate_and_free_keep_counts() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    assert len(a.block_ids) == 3
    assert kv.num_free_blocks == 5 and kv.num_used_blocks == 3
    kv.check_invariants()
    kv.free(a)
    assert kv.num_free_blocks == 8
    kv.check_invariants()


def test_shared_prefix_reuses_blocks_and_counts_refs() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))
    admit(kv, a)
    b = make_request("b", list(range(8)) + [50, 51, 52])
    assert admit(kv, b) == 8
    assert b.block_ids[:2] == a.block_ids[:2]
    assert kv.blocks[a.block_ids[0]].ref_count == 2
    kv.check_invariants()
    kv.free(a)
    assert kv.blocks[b.block_ids[0]].ref_count == 1
    kv.free(b)
    kv.check_invariants()


def test_last_token_is_always_computed() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    admit(kv, make_request("a", list(range(8))))
    same = make_request("b", list(range(8)))
    # Two full blocks match, but the model must run on the last token: only one block is a hit.
    assert admit(kv, same) == 4


def test_hit_requires_same_tokens_and_same_salt() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, make_request("a", list(range(9)), salt="tenant-1"))
    assert admit(kv, make_request("b", list(range(9)), salt="tenant-2")) == 0
    assert admit(kv, make_request("c", [0, 1, 2, 99, 4, 5, 6, 7, 8], salt="tenant-1")) == 0
    assert admit(kv, make_request("d", list(range(9)), salt="tenant-1")) == 8


def test_different_first_block_breaks_the_chain() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, make_request("a", list(range(13))))
    # Same second block, different first block: the chained key differs, so nothing is reused.
    assert admit(kv, make_request("b", [9, 9, 9, 9, 4, 5, 6, 7, 8])) == 0


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(9)))  # 3 blocks, 2 full
    admit(kv, a)
    kv.free(a)
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 4
    # Still a hit after the owner finished.
    b = make_request("b", list(range(9)))
    assert admit(kv, b) == 8
    kv.free(b)
    # Uncached free blocks (the partial tails) are reused first; then the cached blocks go, tail first.
    admit(kv, make_request("c", [70 + i for i in range(5)]))  # 2 blocks: the two uncached ones
    assert len(kv.find_cached_prefix(make_request("x", list(range(9))))) == 2
    admit(kv, make_request("d", [80, 81, 82]))  # 1 block: evicts the prefix's tail
    assert len(kv.find_cached_prefix(make_request("y", list(range(9))))) == 1, "the prefix head outlives its tail"
    admit(kv, make_request("e", [90, 91, 92]))
    assert kv.find_cached_prefix(make_request("z", list(range(9)))) == []
    kv.check_invariants()


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    a = make_request("a", list(range(12)))
    assert not kv.allocate(a, 12)
    assert a.block_ids == [] and kv.num_free_blocks == 2
    kv.check_invariants()


def test_prefix_caching_can_be_disabled() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    admit(kv, make_request("a", list(range(9))))
    assert admit(kv, make_request("b", list(range(9)))) == 0
    assert kv.num_cached_blocks == 0
