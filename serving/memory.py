"""Cache memory as a pool of fixed-size blocks, allocated as sequences grow.

The unit is one **block**: the keys and values of ``block_size`` tokens of one FA layer (at the serving dtype).
The server's budget (``--cache-budget-gib``) is ``num_blocks`` of them. A sequence holds

* for each FA layer of its placement, ``ceil(tokens / block_size)`` blocks, where ``tokens`` is the capacity its
  KV tensors are grown to (``KVCache.reserve``), a block-multiple that follows its length as it decodes;
* for its SWA/GDN/KDA layers, a fixed number of blocks covering their fixed bytes (rounded up once per
  sequence), held from admission to the end;

and the same again for its draft's caches when it speculates. So the pool's count is what the caches'
tensors really take (``SequenceState.allocated_bytes()`` never exceeds it), and a request pays for what it has
generated, not for its ``max_tokens``. Sizes come from ``supernet.cache.state_bytes`` (the one formula).

The prefix cache (serving.prefix_cache) charges its entries to the same pool (``try_cache``), but its blocks are
*evictable*: a sequence that needs blocks gets them by evicting cached entries first (``reclaim``), so
``used_blocks`` (held by sequences) is what the scheduler and the metrics count, and cached blocks count as free,
as in vLLM, where cached blocks that no request references sit in the free queue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from supernet import cache
from supernet.config import SupernetConfig

BLOCK_SIZE = 16  # tokens per block (vLLM's default block size)


def state_bytes(
    config: SupernetConfig, placement: Sequence[str], length: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of one sequence's SequenceState after ``length`` tokens (``supernet.cache.state_bytes``)."""
    return cache.state_bytes(config, placement, length, dtype)


class CacheLayout:
    """Blocks a sequence needs, per placement: ``blocks(placement, tokens)``."""

    def __init__(self, config: SupernetConfig, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be >= 1 token, got {block_size}")
        self.config, self.dtype, self.block_size = config, dtype, block_size
        self.block_bytes = cache.layer_state_bytes(config, "fa", block_size, dtype)
        self._fixed: dict[tuple[str, ...], tuple[int, int]] = {}

    def shape(self, placement: Sequence[str]) -> tuple[int, int]:
        """(FA layers, fixed blocks) of a placement."""
        key = tuple(placement)
        if key not in self._fixed:
            fixed = sum(cache.layer_state_bytes(self.config, m, 0, self.dtype) for m in key if m != "fa")
            self._fixed[key] = (key.count("fa"), -(-fixed // self.block_bytes))
        return self._fixed[key]

    def round_up(self, tokens: int) -> int:
        return -(-tokens // self.block_size) * self.block_size

    def blocks(self, placement: Sequence[str], tokens: int) -> int:
        """Blocks for one sequence whose FA caches hold ``tokens`` positions (a block multiple or not)."""
        n_fa, fixed = self.shape(placement)
        return fixed + n_fa * (self.round_up(tokens) // self.block_size)


class BlockPool:
    """Free/used block counts against the budget (thread-safe: /metrics reads it while the engine writes)."""

    def __init__(self, capacity_bytes: int, block_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"memory budget must be positive, got {capacity_bytes} bytes")
        self.block_bytes = block_bytes
        self.num_blocks = capacity_bytes // block_bytes
        self.used_blocks = 0  # held by sequences
        self.cached_blocks = 0  # held by prefix-cache entries (evictable)
        self.reclaim: Callable[[int], None] | None = None  # evicts cached entries worth >= n blocks
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def used(self) -> int:
        return self.used_blocks * self.block_bytes

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds (cached prefixes included: they are evicted on demand)."""
        return self.num_blocks - self.used_blocks

    def try_allocate(self, blocks: int, keep_free: int = 0) -> bool:
        """Take ``blocks`` for a sequence if at least ``keep_free`` stay free afterwards, evicting cached prefixes
        when that makes them fit (and only then: a request that must wait keeps the cache warm)."""
        return self._take(blocks, keep_free, cached=False)

    def try_cache(self, blocks: int) -> bool:
        """Take ``blocks`` for a prefix-cache entry, evicting older entries when needed."""
        return self._take(blocks, 0, cached=True)

    def _take(self, blocks: int, keep_free: int, cached: bool) -> bool:
        short = self.used_blocks + self.cached_blocks + blocks + keep_free - self.num_blocks
        if 0 < short <= self.cached_blocks and self.reclaim is not None:
            self.reclaim(short)
        with self._lock:
            if self.used_blocks + self.cached_blocks + blocks + keep_free > self.num_blocks:
                return False
            if cached:
                self.cached_blocks += blocks
            else:
                self.used_blocks += blocks
            return True

    def uncache(self, blocks: int) -> None:
        with self._lock:
            self.cached_blocks -= blocks
            assert self.cached_blocks >= 0, "released more cached blocks than were taken"

    def release(self, blocks: int) -> None:
        with self._lock:
            self.used_blocks -= blocks
            assert self.used_blocks >= 0, "released more blocks than were allocated"
