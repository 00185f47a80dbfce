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

from kernels.delta_rule.utils import DeltaRuleInputs, DeltaRuleOutput, delta_rule_op

__all__ = ["naive_delta_rule"]


def _naive(x: DeltaRuleInputs) -> DeltaRuleOutput:
    B, T, H, K = x.k.shape
    V = x.v.shape[-1]
    q, k, v, g, beta = x.tensors
    if x.cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        cu = x.cu_seqlens.tolist()
        bounds = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    outs = torch.zeros(B, T, H, V, dtype=torch.float32, device=v.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        if x.initial_state is None:
            S = torch.zeros(H, K, V, dtype=torch.float32, device=v.device)
        else:
            S = x.initial_state[n].float()
        for t in range(start, end):
            q_t = q[b, t].float() * x.scale  # [H, K]
            k_t = k[b, t].float()
            v_t = v[b, t].float()  # [H, V]
            decay = g[b, t].float().exp()
            S = S * (decay[:, :, None] if x.per_channel else decay[:, None, None])
            u = beta[b, t].float()[:, None] * (v_t - torch.einsum("hkv,hk->hv", S, k_t))
            S = S + k_t[:, :, None] * u[:, None, :]
            outs[b, t] = torch.einsum("hkv,hk->hv", S, q_t)
        finals.append(S)
    final = torch.stack(finals) if x.output_final_state else None
    return outs.to(v.dtype), final


naive_delta_rule = delta_rule_op(
    _naive,
    name="naive_delta_rule",
    doc="""Reference recurrence; ``g`` of shape ``[B, T, H]`` gives GDN, ``[B, T, H, K]`` gives KDA.

    Same arguments and returns as :func:`kernels.chunk_gated_delta_rule` / :func:`kernels.chunk_kda`.
    """,
)
