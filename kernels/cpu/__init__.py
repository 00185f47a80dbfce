"""CPU decode kernels in plain C, compiled on first use with the machine's C compiler and called through ctypes.

Why C here when everything else is PyTorch: a decode step is a few hundred small ops, and two of its pieces are
poorly served by eager torch on CPU. PyTorch's attention for one query row reads a long KV cache at about a
third of the memory bandwidth (docs/benchmarks.md), and each torch op costs microseconds of dispatch that a
50-op layer pays 30 times a step. ``attention_decode.c`` does one sequence's whole attention for one token --
rotary, the cache write, both passes over the cache -- in one call that streams each cached byte once.

The sources hold no Python or torch headers (they take raw pointers into torch tensors), so building is one
``cc`` call of well under a second, cached per source, flags and CPU under ``$SUPERNET_KERNEL_CACHE`` (default
``~/.cache/supernet/kernels``) and written atomically. No compiler, a failed build or
``SUPERNET_CPU_KERNELS=0`` leaves ``library()`` None and callers on their torch path, which computes the same
function (tests pin the two together); ``supernet.fastpath.reference_path()`` also turns the callers' use off.
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
from pathlib import Path

from torch import Tensor

__all__ = ["attention_decode", "library"]

log = logging.getLogger(__name__)

SOURCES = ("attention_decode.c",)
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
    for part in [compiler, *FLAGS, _cpu_identity(), *(p.read_text() for p in sources)]:
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


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (callers then use torch)."""
    if os.environ.get("SUPERNET_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        log.warning("no C compiler (%s): decode attention runs on torch's CPU attention", compiler)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("CPU decode kernels did not build, using torch's attention instead: %s", detail)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.attention_decode_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64,
                                         ctypes.c_float, ptr]
    lib.attention_decode_f32.restype = ctypes.c_int
    return lib


def attention_decode(
    lib: ctypes.CDLL,
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cos: Tensor | None,
    sin: Tensor | None,
    k_cache: Tensor,
    v_cache: Tensor,
    slot: int,
    n_attend: int,
    scale: float,
    out: Tensor,
) -> None:
    """One sequence's attention for one new token (see attention_decode.c), fp32 CPU tensors.

    q [H * D], k_new / v_new [Hkv * D] (q and k before rotary), cos / sin [D] (None: no rotary), caches
    [Hkv, capacity, D] (any stride between heads, rows contiguous), out [H * D]. The new key/value go to
    ``slot`` and the query attends to slots [0, n_attend). The caller checks dtypes and layouts once per layer;
    this runs per row, so it only passes pointers."""
    hkv, _, d = k_cache.shape
    rc = lib.attention_decode_f32(
        q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), None if cos is None else cos.data_ptr(),
        None if sin is None else sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), slot,
        n_attend, q.shape[-1] // d, hkv, d, scale, out.data_ptr(),
    )
    if rc != 0:
        raise RuntimeError(f"attention_decode_f32 refused heads={q.shape[-1] // d} kv_heads={hkv} head_dim={d}")
