"""Guarded dispatch to flash-linear-attention's Triton kernels on CUDA.

UNTESTED HERE: the machines this project is developed on have no GPU and no ``fla``; this path only exists
so the same model code runs at full speed on a CUDA box that has ``fla`` installed. It is taken only when
all of these hold: a CUDA device is present, the inputs live on CUDA, and ``fla`` imports. Everything
else (CPU, or CUDA without ``fla``) uses the pure-PyTorch kernels in this package.

We always pass q/k already L2-normalised (``use_qk_l2norm_in_kernel=False``) and an fp32 initial state,
matching this package's contract.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


@functools.cache
def _fla_ops() -> dict[str, Callable[..., Any]] | None:
    """Import fla's delta-rule ops once; ``None`` when not installed or broken (e.g. no triton)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except Exception:  # ImportError, or triton failing to initialise: fall back to torch
        return None
    return {
        "chunk_gdn": chunk_gated_delta_rule,
        "recurrent_gdn": fused_recurrent_gated_delta_rule,
        "chunk_kda": chunk_kda,
        "recurrent_kda": fused_recurrent_kda,
    }


def use_fla(x: Tensor) -> bool:
    """True when the call should go to fla (CUDA inputs and fla importable). Cheap on CPU: no import tried."""
    return x.is_cuda and torch.cuda.is_available() and _fla_ops() is not None


def call(
    name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Run fla op ``name`` (one of chunk_gdn, recurrent_gdn, chunk_kda, recurrent_kda). UNTESTED HERE."""
    ops = _fla_ops()
    if ops is None:
        raise RuntimeError("flash-linear-attention (fla) is not importable")
    op = ops[name]
    o, final = op(
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=False,
    )
    return o.to(v.dtype), (final.float() if final is not None and output_final_state else None)
