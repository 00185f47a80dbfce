"""CPU decode kernels in plain C, compiled on first use with the machine's C compiler and called through ctypes.

Why C here when everything else is PyTorch: four pieces of a decode step are poorly served by eager torch on
CPU, measured on one thread (docs/benchmarks.md):

* ``attention_decode.c``: torch's attention for one query row reads a long KV cache at about a third of the
  memory bandwidth. This does one sequence's whole attention for one token -- rotary, the cache write, both
  passes over the cache -- in one call that streams each cached byte once.
* ``delta_decode.c``: a GDN/KDA token is ~35 small torch ops per layer (conv, norms, gates, the state update),
  each microseconds of dispatch over a few kilobytes. This is one call per layer.
* ``norm.c``: torch's fused RMSNorm costs ~10-20 us for one row, twice per layer and once at the end;
  ``activation.c``: the MLP's silu(gate) * up, two ops and a temporary in torch.
* ``linear.c``: a decode step's products (1 to a few dozen rows) stream every weight of the model; oneDNN's
  packed product reads them at roughly half the memory's rate at 8 rows (~17-20 GB/s on one thread here), this
  blocked layout at ~25-34 GB/s from 1 to 8 rows.

The sources hold no Python or torch headers (they take raw pointers into torch tensors), so building is one
``cc`` call of well under a second, cached per source, flags and CPU under ``$SUPERNET_KERNEL_CACHE`` (default
``~/.cache/supernet/kernels``) and written atomically. No compiler, a failed build or
``SUPERNET_CPU_KERNELS=0`` leaves ``library()`` None and callers on their torch path, which computes the same
function (tests pin the two together); ``supernet.fastpath.reference_path()`` also turns the callers' use off.
They are single-threaded (one thread is the server's default on the small CPUs they were written for; with
more torch threads the rest of the step still uses them) and fp32 only (bf16 models keep the torch paths).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "MAX_DELTA_HEAD_DIM", "MAX_QUERY_GROUPS", "attention_decode", "block_weight", "delta_decode", "library",
    "linear_rows", "rms_norm", "set_enabled", "silu_mul",
]

log = logging.getLogger(__name__)

# Shapes the kernels serve (callers take their torch path otherwise): query heads per KV head in
# attention_decode.c, the head dim of delta_decode.c (its per-head scratch lives on the stack).
MAX_QUERY_GROUPS = 16
MAX_DELTA_HEAD_DIM = 256

SOURCES = ("activation.c", "attention_decode.c", "delta_decode.c", "linear.c", "norm.c")
# -fassociative-math (with the two flags it needs) lets the compiler vectorise the dot products' reductions
# without -ffast-math, which would also flush denormals process-wide when the library loads.
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
         "-fassociative-math")


def _cpu_identity() -> str:
    """What -march=native compiles for: the cached library must not travel to another CPU model."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return platform.machine() + "\n" + "\n".join(dict.fromkeys(lines))


def _cache_dir() -> Path:
    root = os.environ.get("SUPERNET_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "supernet", "kernels"
    )
    return Path(root)


def _build(compiler: str) -> Path:
    here = Path(__file__).parent
    sources = [here / name for name in SOURCES]
    digest = hashlib.sha256()
    headers = sorted(here.glob("*.h"))
    for part in [compiler, *FLAGS, _cpu_identity(), *(p.read_text() for p in [*sources, *headers])]:
        digest.update(part.encode())
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"decode_kernels_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, *map(str, sources), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent loader sees the old state or the whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_ENABLED = [True]  # set_enabled(False): callers take their torch paths (tests run both)


def set_enabled(enabled: bool) -> bool:
    """Use the kernels (where they build) or not, process-wide; returns the previous setting."""
    previous, _ENABLED[0] = _ENABLED[0], enabled
    return previous


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built or are switched off (callers then use torch)."""
    return _load() if _ENABLED[0] else None


@functools.cache
def _load() -> ctypes.CDLL | None:
    if os.environ.get("SUPERNET_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        log.warning("no C compiler (%s): the decode step runs on its slower torch paths", compiler)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("CPU decode kernels did not build, the decode step runs on its torch paths: %s", detail)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.attention_decode_f32.argtypes = [i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr,
                                         ptr, i64, i64, i64, ctypes.c_float, ptr, i64]
    lib.attention_decode_f32.restype = ctypes.c_int
    lib.delta_decode_f32.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64,
                                     ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, i64,
                                     ctypes.c_int, ptr, ptr, ctypes.c_float, ptr]
    lib.delta_decode_f32.restype = ctypes.c_int
    lib.linear_blocked_f32.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.linear_blocked_f32.restype = None
    lib.rms_norm_f32.argtypes = [ptr, ptr, ctypes.c_float, i64, i64, ptr]
    lib.rms_norm_f32.restype = None
    lib.silu_mul_f32.argtypes = [ptr, i64, i64, ptr]
    lib.silu_mul_f32.restype = None
    return lib


LINEAR_BLOCK = 16  # output channels per block of linear.c's weight layout


def block_weight(weight: Tensor) -> Tensor:
    """weight [out, in] in linear.c's layout: [ceil(out / 16), in, 16], blocks of 16 output channels, each
    stored k-major so the kernel reads it as one sequential stream (the last block zero-padded)."""
    out_features, in_features = weight.shape
    blocks = -(-out_features // LINEAR_BLOCK)
    padded = weight.new_zeros(blocks * LINEAR_BLOCK, in_features)
    padded[:out_features] = weight
    return padded.view(blocks, LINEAR_BLOCK, in_features).transpose(1, 2).contiguous()


def linear_rows(
    lib: ctypes.CDLL, x: Tensor, blocked: Tensor, bias: Tensor | None, out_features: int, add_to: Tensor | None = None
) -> Tensor:
    """``F.linear(x, weight, bias)`` with ``blocked = block_weight(weight)`` (see linear.c): x fp32 with unit
    stride along its features (any leading shape), bias [out] contiguous or None. With ``add_to`` (contiguous,
    x's rows by ``out_features``) the product is added to it in place instead (a residual connection) and
    ``add_to`` is returned."""
    in_features = blocked.shape[1]
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    y = x.new_empty(rows, out_features) if add_to is None else add_to
    lib.linear_blocked_f32(x2.data_ptr(), x2.stride(0), rows, blocked.data_ptr(),
                           None if bias is None else bias.data_ptr(), out_features, in_features, y.data_ptr(),
                           out_features, add_to is not None)
    return y.view(*x.shape[:-1], out_features) if add_to is None else add_to


def silu_mul(lib: ctypes.CDLL, gate_up: Tensor) -> Tensor:
    """silu(gate) * up of a contiguous fp32 gate | up tensor [..., 2 * width] (see activation.c)."""
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], width)
    lib.silu_mul_f32(gate_up.data_ptr(), gate_up.numel() // (2 * width), width, out.data_ptr())
    return out


def rms_norm(lib: ctypes.CDLL, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim of a contiguous fp32 tensor (see norm.c); weight [dim] contiguous or None."""
    out = torch.empty_like(x)
    dim = x.shape[-1]
    lib.rms_norm_f32(x.data_ptr(), None if weight is None else weight.data_ptr(), eps, x.numel() // dim, dim,
                     out.data_ptr())
    return out


def attention_decode(
    lib: ctypes.CDLL,
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    caches: Sequence[tuple[Tensor, Tensor, int, int]],
    scale: float,
    out: Tensor,
    ring_positions: Sequence[tuple[Tensor, int]] | None = None,
) -> None:
    """Attention for one new token per row (see attention_decode.c), fp32 CPU tensors.

    q [N, H * D], k_new / v_new [N, Hkv * D] (q and k before rotary; rows may be strided, channels not),
    cos / sin [N, D] (None: no rotary), out [N, H * D]. ``caches[i]`` = (keys, values, slot, n_attend) of row
    i: [Hkv, capacity, D] tensors with rows of D contiguous floats and the same stride between heads; the new
    key/value go to ``slot`` and the query attends to slots [0, n_attend). ``ring_positions[i]`` = (row i's
    contiguous int64 position-per-slot tensor, the new token's position), written at ``slot`` (SWA rings). The
    caller checks dtypes and layouts once per layer (this runs per layer per step, so it only gathers
    pointers)."""
    n = len(caches)
    hkv, d = caches[0][0].shape[0], caches[0][0].shape[2]
    i64s, ptrs = ctypes.c_int64 * n, ctypes.c_void_p * n
    rings = positions = None
    if ring_positions is not None:
        rings = ptrs(*(r[0].data_ptr() for r in ring_positions))
        positions = i64s(*(r[1] for r in ring_positions))
    rc = lib.attention_decode_f32(
        n, q.data_ptr(), q.stride(0), k_new.data_ptr(), v_new.data_ptr(), k_new.stride(0),
        None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
        0 if cos is None else cos.stride(0), ptrs(*(c[0].data_ptr() for c in caches)),
        ptrs(*(c[1].data_ptr() for c in caches)), i64s(*(c[0].stride(0) for c in caches)),
        i64s(*(c[2] for c in caches)), i64s(*(c[3] for c in caches)), rings, positions, q.shape[-1] // d, hkv, d,
        scale, out.data_ptr(), out.stride(0),
    )
    if rc != 0:
        raise RuntimeError(f"attention_decode_f32 refused heads={q.shape[-1] // d} kv_heads={hkv} head_dim={d}")


def delta_decode(
    lib: ctypes.CDLL,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_lora: tuple[Tensor, Tensor] | None,
    v_lora: tuple[Tensor, Tensor] | None,
    conv_state: Tensor,
    conv_weight: Tensor,
    decay_in: Tensor,
    decay_up: Tensor | None,
    dt_bias: Tensor,
    a_log: Tensor,
    beta_logit: Tensor,
    gate: tuple[Tensor, Tensor, Tensor | None],
    gate_activation: str,
    state: Tensor,
    norm_weight: Tensor,
    norm_eps: float,
) -> Tensor:
    """One GDN/KDA token per row (see delta_decode.c): the conv input (k/v heads tiled, LoRA deltas added),
    conv, SiLU, L2 norms, the output gate's and the decay's up projections, decay, beta, the delta rule on
    ``state`` and the gated RMSNorm; returns the output projection's input [N, H * D].

    fp32 CPU tensors whose rows have unit stride along the channels: q [N, W], k / v [N, Hkv * D] (Hkv divides
    H), ``k_lora`` / ``v_lora`` = (A output [N, rank], B factor transposed [rank, W]) or None; decay_in [N, H]
    (GDN: the logits) or [N, rank] with ``decay_up`` [rank, W] (KDA's up projection, transposed: one logit per
    key channel), both before ``dt_bias``; beta_logit [N, H]; ``gate`` = (input [N, rank], up weight transposed
    [rank, W], bias [W] or None); conv_state [N, 3W, kw - 1] and state [N, H, D, D] contiguous (advanced in
    place); conv_weight [3W, kw], a_log [H], norm_weight [D]. The up projections come transposed because the
    kernel runs them as a sum of rows (see delta_decode.c up_project)."""
    n, h, d = state.shape[:3]
    gate_in, gate_up, gate_bias = gate
    weights = [conv_state, state, conv_weight, dt_bias, a_log, norm_weight, gate_up]
    weights += [t for t in (gate_bias, decay_up) if t is not None]
    if not all(t.is_contiguous() for t in weights):
        raise ValueError("delta_decode needs contiguous states and weights")
    if k.stride(0) != v.stride(0) or (k_lora is None) != (v_lora is None):
        raise ValueError("delta_decode needs k and v (and their LoRA inputs) laid out alike")
    ak = bk = av = bv = None
    rank = a_stride = 0
    if k_lora is not None and v_lora is not None:
        (ak, bk), (av, bv) = k_lora, v_lora
        rank, a_stride = bk.shape[0], ak.stride(0)
        if av.stride(0) != a_stride or not (bk.is_contiguous() and bv.is_contiguous()):
            raise ValueError("delta_decode needs the LoRA inputs laid out alike and contiguous B factors")
    out = q.new_empty(n, h * d)

    def ptr(t: Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    rc = lib.delta_decode_f32(
        n, h, d, conv_weight.shape[1], q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0),
        k.shape[-1] // d, ptr(ak), ptr(av), a_stride, ptr(bk), ptr(bv), rank, conv_state.data_ptr(),
        conv_weight.data_ptr(), decay_in.data_ptr(), decay_in.stride(0), ptr(decay_up),
        0 if decay_up is None else decay_up.shape[0], dt_bias.data_ptr(), a_log.data_ptr(), beta_logit.data_ptr(),
        beta_logit.stride(0), gate_in.data_ptr(), gate_in.stride(0), gate_up.data_ptr(), ptr(gate_bias),
        gate_up.shape[0], int(gate_activation == "sigmoid"), state.data_ptr(), norm_weight.data_ptr(), norm_eps,
        out.data_ptr(),
    )
    if rc != 0:
        raise RuntimeError(f"delta_decode_f32 refused heads={h} kv_heads={k.shape[-1] // d} head_dim={d}")
    return out
