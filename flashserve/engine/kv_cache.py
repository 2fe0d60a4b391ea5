"""The paged KV cache: a pool of fixed-size blocks, each request's block table,
and the prefix cache that lets a new prompt reuse the blocks of an earlier one.

Bookkeeping (which block belongs to whom) lives in `KVCacheManager`; the
tensors themselves live in `KVCacheStorage`, allocated once per layer from the
`CacheSpec` each layer of the model declares.

A full block is keyed by a chained hash: its parent's key, a per-tenant salt
and its own tokens. A hit also compares the stored tokens and parent key, so a
hash collision can never serve another prompt's K/V. Blocks whose last owner
finished stay cached on an LRU free list and are evicted only when the pool
needs them.

A runner whose cached prefixes need more than the blocks (DeepSeek-V4's state copies) is the manager's
`PrefixStore`: a hit is cut to what it can resume, and it hears of every block evicted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from flashserve.models.layers import FULL_ATTENTION, CacheSpec, LayerKVCache

if TYPE_CHECKING:
    from flashserve.engine.request import Request

_ROOT = b"flashserve-kv-root"


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    key: bytes | None = None  # set once the block is full and registered in the prefix cache
    parent_key: bytes | None = None
    token_ids: tuple[int, ...] = field(default=())


def block_key(parent_key: bytes | None, salt: str, token_ids: tuple[int, ...]) -> bytes:
    """Chained key of a full block: it depends on every token before it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_key or _ROOT)
    h.update(salt.encode())
    h.update(b"|")
    h.update(",".join(map(str, token_ids)).encode())
    return h.digest()


class PrefixStore(Protocol):
    """What else a prefix hit needs besides its blocks (`runner.Runner` extends it)."""

    def resumable_blocks(self, keys: Sequence[bytes]) -> int:
        """How many of the hit's leading blocks (by chained key) can be resumed."""
        ...

    def evicted(self, key: bytes) -> None:
        """The block cached under `key` was reused for other tokens."""
        ...


class KVCacheManager:
    """Allocates blocks to requests and serves prefix-cache hits."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 prefix_store: PrefixStore | None = None) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_store = prefix_store
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (oldest first); cached ones keep their key until reused.
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, Block] = {}

    # -- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """The longest run of cached blocks matching the start of the request.

        At least one token is always left to compute: the model must run on
        the last token to produce the next one.
        """
        if not self.enable_prefix_caching:
            return []
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hits: list[Block] = []
        parent: bytes | None = None
        for i in range(max_blocks):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            key = block_key(parent, request.cache_salt, chunk)
            block = self._cached.get(key)
            if block is None or block.token_ids != chunk or block.parent_key != parent:
                break
            hits.append(block)
            parent = key
        if hits and self.prefix_store is not None:
            hits = hits[:self.prefix_store.resumable_blocks([b.key for b in hits])]  # type: ignore[misc]
        return hits

    # -- allocation ------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: list[Block] = ()) -> bool:
        """Give `request` blocks for `num_new_tokens` more tokens after its computed
        ones (and after `cached_prefix`, a fresh hit from `find_cached_prefix`).
        Returns False, changing nothing, when the pool is short."""
        held = len(request.block_ids) + len(cached_prefix)
        total_tokens = request.num_computed_tokens + len(cached_prefix) * self.block_size + num_new_tokens
        new_blocks = max(0, self.blocks_needed(total_tokens) - held)
        revived = sum(1 for b in cached_prefix if b.ref_count == 0)
        if new_blocks + revived > self.num_free_blocks:
            return False
        for block in cached_prefix:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1
            request.block_ids.append(block.block_id)
            request.block_hashes.append(block.key)  # type: ignore[arg-type]
        for _ in range(new_blocks):
            request.block_ids.append(self._take_free_block().block_id)
        return True

    def _take_free_block(self) -> Block:
        _, block = self._free.popitem(last=False)
        if block.key is not None:
            # Evicting: the block's old contents are about to be overwritten.
            if self._cached.get(block.key) is block:
                del self._cached[block.key]
                if self.prefix_store is not None:
                    self.prefix_store.evicted(block.key)
            block.key, block.parent_key, block.token_ids = None, None, ()
        block.ref_count = 1
        return block

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        tokens = request.all_token_ids
        for i in range(len(request.block_hashes), num_full):
            parent = request.block_hashes[i - 1] if i else None
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            key = block_key(parent, request.cache_salt, chunk)
            request.block_hashes.append(key)
            block = self.blocks[request.block_ids[i]]
            if block.key is None and key not in self._cached:
                block.key, block.parent_key, block.token_ids = key, parent, chunk
                self._cached[key] = block

    def free(self, request: Request) -> None:
        """Drop the request's references. Its tail blocks go to the front of the
        eviction order so that shared prefixes outlive the suffixes after them."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = block
        request.block_ids.clear()
        request.block_hashes.clear()

    def reset_prefix_cache(self) -> None:
        for key in list(self._cached):
            block = self._cached.pop(key)
            block.key, block.parent_key, block.token_ids = None, None, ()

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent."""
        free_ids = set(self._free)
        assert len(free_ids) == len(self._free)
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has refcount {block.ref_count}"
            assert (block.ref_count == 0) == (block.block_id in free_ids), f"block {block.block_id}"
        for key, block in self._cached.items():
            assert block.key == key and len(block.token_ids) == self.block_size
        assert self.num_free_blocks + self.num_used_blocks == self.num_blocks

    def stats(self) -> dict[str, int]:
        return {
            "total_blocks": self.num_blocks,
            "free_blocks": self.num_free_blocks,
            "used_blocks": self.num_used_blocks,
            "cached_blocks": self.num_cached_blocks,
            "block_size": self.block_size,
        }


class KVCacheStorage:
    """The preallocated tensors behind the block pool, one entry per layer."""

    def __init__(
        self, specs: list[CacheSpec], num_blocks: int, block_size: int, dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        num_slots = num_blocks * block_size
        self.layers: list[LayerKVCache] = []
        for spec in specs:
            assert spec.kind == FULL_ATTENTION, spec.kind
            shape = (num_slots, spec.num_kv_heads, spec.head_dim)
            # Uninitialised: a slot is always written before it is read, and untouched pages cost no RSS.
            self.layers.append(LayerKVCache(
                key=torch.empty(shape, dtype=dtype, device=device),
                value=torch.empty(shape, dtype=dtype, device=device),
            ))

    @staticmethod
    def bytes_per_token(specs: list[CacheSpec], dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(2 * s.num_kv_heads * s.head_dim * itemsize for s in specs)
