"""One switch for every decode fast path, so tests and benchmarks can run the reference path beside it.

The fast paths (prepacked linear weights, fused GDN/KDA single-token steps with in-place states, batched
attention over the running rows, the C kernels of kernels/cpu) compute the same function as the reference path
up to fp32 rounding; the reference path is the plain code every mixer documents. ``reference_path()`` turns the
fast paths off within a block, process-wide (the engine is single-threaded, and so are tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kernels import cpu as cpu_kernels
from kernels.linear import set_packed_enabled

_ENABLED = [True]


def fast_path_enabled() -> bool:
    return _ENABLED[0]


@contextmanager
def reference_path() -> Iterator[None]:
    """Run the block on the reference path (no packed weights, no fused decode steps, no C kernels)."""
    previous, _ENABLED[0] = _ENABLED[0], False
    previous_packed = set_packed_enabled(False)
    previous_kernels = cpu_kernels.set_enabled(False)
    try:
        yield
    finally:
        _ENABLED[0] = previous
        set_packed_enabled(previous_packed)
        cpu_kernels.set_enabled(previous_kernels)
