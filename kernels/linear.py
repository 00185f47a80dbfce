"""Linear layers for decode steps: the same ``x W^T + b``, with the weights prepacked for oneDNN on CPU.

A decode step multiplies a handful of rows (one per running sequence) by every weight matrix of the model, so
it is bound by reading the weights. Through ``F.linear`` (MKL, row-major ``[out, in]`` weights) one CPU thread
streams them at well under half the memory bandwidth at 1 row, and at 8 rows it is worse still. oneDNN's
blocked layout -- what inductor's CPU ``freezing`` pass prepacks weights into -- measured 1.7x faster at one row
and 2.2x at 8 rows here (benchmarks/bench_linear.py). Several projections that read the same
input can also be packed as one matrix (q/k/v, the MLP's gate/up), so each step issues fewer, larger calls,
and a packed copy may be any function of the weights (``derived_linear``): the LoRA mixers' decode copies have
their low-rank deltas merged in, so they read the teacher's bytes in one call instead of three.

The packed copies are an inference-only cache, held on the module that owns the weights (outside its
``state_dict``), keyed by each weight's storage and version counter: an optimizer step or a checkpoint load
invalidates them. They double the resident weight bytes of the layers a decode step touches; the step itself
still reads each weight once. Decode-sized products (up to ``BLOCKED_MAX_ROWS`` rows) on one torch thread skip
oneDNN for the C kernel of ``kernels.cpu`` (kernels/cpu/linear.c), which streams a copy of the weight in blocks of
16 output channels: 1.0-1.2x oneDNN's rate at one row and 1.35-1.6x at 8 (benchmarks/bench_linear.py, runs
on a VM whose bandwidth drifts), so those layers' weights are held three times (the parameters, the packed copy,
the blocked copy). With more threads oneDNN's threaded kernels
keep them (at two threads here the two were even).

Prefill and scoring gain too: at 64-1,024 rows oneDNN's packed fp32 product ran at ~220 GFLOP/s on one thread
here against ~100 for ``F.linear`` (MKL), so under ``torch.inference_mode`` (the engine, evaluation, placement
measurement) every product takes the packed path whatever its size. A plain ``no_grad`` block takes it only for
decode-sized inputs: that is where training validates weights that change between calls, and repacking them
for one pass would cost more than it saves. With autograd on, or an input that is not fp32 (or bf16, see
``PACKED_DTYPES``) on CPU, this is plain ``F.linear``; ``supernet.fastpath.reference_path()`` turns the packed
path off for reference numerics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import cpu as cpu_kernels

__all__ = [
    "SMALL_ROWS", "PreparedLinear", "derived", "derived_linear", "fused_linear", "linear", "packed_available",
    "prepare", "prepare_fused", "set_packed_enabled", "sources_key", "use_packed",
]

# Outside inference mode, calls with at most SMALL_TOKENS tokens per sequence (decode steps, speculative
# verification) and at most SMALL_ROWS rows in all take the packed path (see the module docstring).
SMALL_ROWS = 64
SMALL_TOKENS = 8
PACK_ROWS_HINT = 8  # the row count oneDNN tunes the packed layout for (it serves any count)
# oneDNN costs ~10 us per call whatever the size (measured here), which F.linear beats on small weights (LoRA
# factors, gate projections): below this many elements a (fused) weight stays a plain tensor for F.linear.
PACK_MIN_NUMEL = 1 << 17
# Up to this many rows (and on one torch thread: the kernel is single-threaded) a product runs on the C kernel
# of kernels/cpu/linear.c over a blocked copy of the weight instead of oneDNN (benchmarks/bench_linear.py).
BLOCKED_MAX_ROWS = 16


def packed_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


_AVAILABLE = packed_available()
# dtypes the packed path serves: fp32, and bf16 where oneDNN has bf16 kernels (AVX512-BF16 / AMX CPUs). A bf16
# model reads half the weight bytes per decode step; through ``F.linear`` bf16 products ran at ~10 GB/s here,
# slower than fp32's packed path, while packed bf16 streams at the fp32 rate (benchmarks/bench_linear.py).
PACKED_DTYPES = (torch.float32, torch.bfloat16) if _AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
    else (torch.float32,)
_ENABLED = [True]  # switched off by supernet.fastpath.reference_path() to run the plain path side by side


def set_packed_enabled(enabled: bool) -> bool:
    """Turn the packed path on or off process-wide; returns the previous setting."""
    previous, _ENABLED[0] = _ENABLED[0], enabled
    return previous


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter (they cannot change)
        return -1


def sources_key(tensors: Sequence[Tensor | None]) -> tuple:
    """What identifies the state of some weights: storage, dtype, shape and version of each (a training step, a
    load or a replacement changes it); caches of tensors derived from them compare it."""
    return tuple(None if t is None else (t.data_ptr(), t.dtype, tuple(t.shape), _version(t)) for t in tensors)


def use_packed(x: Tensor) -> bool:
    """Whether a linear layer applied to ``x`` takes the packed path (weights of ``x``'s dtype assumed; see the
    module docstring)."""
    if not (
        _AVAILABLE
        and _ENABLED[0]
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in PACKED_DTYPES
        and x.dim() >= 2
    ):
        return False
    if torch.is_inference_mode_enabled():
        return True
    return x.shape[-2] <= SMALL_TOKENS and x.numel() <= SMALL_ROWS * x.shape[-1]


@dataclass(frozen=True)
class PreparedLinear:
    """One decode-path weight in every form its products use: oneDNN-packed (or plain, if small or of a dtype
    oneDNN does not pack), a copy in the C kernel's blocked layout (fp32, where the kernels build), the bias.
    Calling it multiplies; it stays valid until a source weight changes (``prepare`` rebuilds it then)."""

    weight: Tensor
    blocked: Tensor | None
    bias: Tensor | None
    out_features: int

    def __call__(self, x: Tensor, add_to: Tensor | None = None) -> Tensor:
        """``F.linear(x, weight, bias)``; with ``add_to`` ([rows, out] contiguous) added to it in place instead
        (a residual connection: no temporary on the C kernel's path)."""
        if (self.blocked is not None and x.dtype == torch.float32 and x.stride(-1) == 1
                and x.numel() <= BLOCKED_MAX_ROWS * x.shape[-1] and torch.get_num_threads() == 1):
            lib = cpu_kernels.library()
            if lib is not None:
                return cpu_kernels.linear_rows(lib, x, self.blocked, self.bias, self.out_features, add_to)
        if self.weight.is_mkldnn:
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if add_to is None else add_to.add_(y.view_as(add_to))


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, owner: nn.Module | None = None, name: str = "weight"
) -> Tensor:
    """``F.linear(x, weight, bias)``; packed when ``use_packed(x)`` and an ``owner`` module holds the cache
    (under ``name``)."""
    if owner is None or weight.numel() < PACK_MIN_NUMEL or weight.dtype != x.dtype or not use_packed(x):
        return F.linear(x, weight, bias)
    return fused_linear(x, owner, name, [weight], [bias])


def prepare_fused(
    owner: nn.Module, name: str, weights: Sequence[Tensor], biases: Sequence[Tensor | None] = ()
) -> PreparedLinear:
    """The projections ``weights`` (with ``biases``: empty for none, or one entry per weight, None where that
    projection has none) concatenated along their outputs as one prepared weight, cached on ``owner`` under
    ``name`` (one cache entry per name)."""
    biases = list(biases) or [None] * len(weights)

    def make() -> tuple[Tensor, Tensor | None]:
        w = weights[0] if len(weights) == 1 else torch.cat(list(weights), dim=0)
        bias = None
        if any(b is not None for b in biases):
            parts = zip(weights, biases, strict=True)
            bias = torch.cat([b.detach() if b is not None else w_.new_zeros(w_.shape[0]) for w_, b in parts])
        return w, bias

    return prepare(owner, name, [*weights, *biases], make)


def fused_linear(
    x: Tensor, owner: nn.Module, name: str, weights: Sequence[Tensor], biases: Sequence[Tensor | None] = ()
) -> Tensor:
    """``torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` as one packed call (see
    ``prepare_fused``); callers check ``use_packed(x)`` first (the unpacked path is theirs to write as plainly
    as before)."""
    return prepare_fused(owner, name, weights, biases)(x)


def prepare(
    owner: nn.Module, name: str, sources: Sequence[Tensor | None], make: Callable[[], tuple[Tensor, Tensor | None]]
) -> PreparedLinear:
    """``make()``'s weight and bias -- any function of ``sources``, e.g. several projections concatenated or a
    LoRA delta merged in -- built once, prepared (packed, blocked) and cached on ``owner`` under ``name`` until a
    source changes."""

    def build() -> PreparedLinear:
        w, bias = make()
        w = w.detach().contiguous()
        bias = None if bias is None else bias.detach().contiguous()
        # decode-sized products stream a copy in the C kernel's blocked layout (see the module docstring)
        blocked = cpu_kernels.block_weight(w) if w.dtype == torch.float32 and cpu_kernels.library() else None
        out_features = w.shape[0]
        if w.dtype in PACKED_DTYPES and w.numel() >= PACK_MIN_NUMEL:
            w = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT)
        return PreparedLinear(w, blocked, bias, out_features)

    return derived(owner, name, sources, build)


def derived_linear(
    x: Tensor,
    owner: nn.Module,
    name: str,
    sources: Sequence[Tensor | None],
    make: Callable[[], tuple[Tensor, Tensor | None]],
) -> Tensor:
    """``F.linear(x, *make())`` through ``prepare``'s cached weight. Callers check ``use_packed(x)`` first."""
    return prepare(owner, name, sources, make)(x)


def derived(owner: nn.Module, name: str, sources: Sequence[Tensor | None], build: Callable[[], Any]) -> Any:
    """``build()``, cached on ``owner`` under ``name`` until one of ``sources`` changes (storage or version).

    For inference-only copies of weights in another layout (packed, fused, block-diagonal): they live in the
    module's ``__dict__``, outside its ``state_dict``, and are rebuilt after an optimizer step or a load."""
    key = sources_key(sources)
    cache = owner.__dict__.setdefault("_derived_weights", {})
    entry = cache.get(name)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = cache[name] = (key, build())
    return entry[1]
