"""Chunked form (placeholder: delegates to the recurrence until the WY form lands)."""

from __future__ import annotations

from torch import Tensor

from kernels import fla
from kernels.delta_rule.recurrent import recurrent_delta_rule
from kernels.delta_rule.utils import check_inputs

__all__ = ["chunk_gated_delta_rule", "chunk_kda"]


def chunk_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    check_inputs(q, k, v, g, beta, per_channel=False)
    if fla.use_fla(q):
        return fla.call("chunk_gdn", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return recurrent_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def chunk_kda(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    check_inputs(q, k, v, g, beta, per_channel=True)
    if fla.use_fla(q):
        return fla.call("chunk_kda", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return recurrent_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
