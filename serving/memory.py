"""Cache memory accounting for admission control.

A request is admitted when the cache it will hold *at its full length* (prompt + max_tokens, times n) fits in
what is left of the budget. What that costs depends on the preset: FA layers grow with the sequence, SWA
layers stop at sinks + window, GDN/KDA layers are a fixed-size state. So the same budget admits many more long
requests on a linear preset than on all-FA -- admission by bytes, not by a request count, is what lets the
server say so.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from supernet.config import SupernetConfig


def state_bytes(
    config: SupernetConfig, placement: Sequence[str], length: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of one sequence's SequenceState after ``length`` tokens (what SequenceState.nbytes() reports)."""
    elt = torch.finfo(dtype).bits // 8
    total = 0
    for name in placement:
        if name == "fa":
            total += 2 * config.fa.num_kv_heads * config.fa.head_dim * length * elt
        elif name == "swa":
            total += (
                2
                * config.swa.num_kv_heads
                * config.swa.head_dim
                * (config.swa.sinks + (config.swa.window or 0))  # an SWA config always has a window
                * elt
            )
        else:
            d = getattr(config, name)
            width = d.num_heads * d.head_dim
            total += 3 * width * (d.conv_kernel - 1) * elt + d.num_heads * d.head_dim * d.head_dim * 4
    return total


class MemoryBudget:
    """Bytes reserved by admitted requests against a fixed budget (thread-safe: /metrics reads it)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"memory budget must be positive, got {capacity} bytes")
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def try_reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.capacity:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes
            assert self.used >= 0, "released more cache than was reserved"
