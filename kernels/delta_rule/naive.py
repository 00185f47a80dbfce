"""Token-by-token reference for the gated delta rule (GDN) and Kimi Delta Attention (KDA).

This is the specification the fast forms are tested against, written to read like the math and nothing
else: one state per (sequence, head), one Python step per token, fp32 throughout, no tricks. It is slow
(O(T) Python steps) and only meant for tests and for checking new kernels.

Per token, with state ``S`` of shape ``[K, V]``::

    S' = exp(g) * S            # GDN: one scalar per head; KDA: row d scaled by exp(g[d])
    u  = beta * (v - S'^T k)   # delta rule: write only what S' does not already predict for k
    S  = S' + k u^T
    o  = S^T (scale * q)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["naive_delta_rule"]


def naive_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Reference recurrence; ``g`` of shape ``[B, T, H]`` gives GDN, ``[B, T, H, K]`` gives KDA.

    Same arguments and returns as :func:`kernels.chunk_gated_delta_rule` / :func:`kernels.chunk_kda`.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    per_channel = g.dim() == 4
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        bounds = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    outs = torch.zeros(B, T, H, V, dtype=torch.float32, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if initial_state is None:
            S = torch.zeros(H, K, V, dtype=torch.float32, device=v.device)
        else:
            S = initial_state[n].float()
        for t in range(start, end):
            q_t = q[b, t].float() * scale  # [H, K]
            k_t = k[b, t].float()
            v_t = v[b, t].float()  # [H, V]
            decay = g[b, t].float().exp()
            S = S * (decay[:, :, None] if per_channel else decay[:, None, None])
            u = beta[b, t].float()[:, None] * (v_t - torch.einsum("hkv,hk->hv", S, k_t))
            S = S + k_t[:, :, None] * u[:, None, :]
            outs[b, t] = torch.einsum("hkv,hk->hv", S, q_t)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return outs.to(v.dtype), final
