"""Recurrent (token-by-token) form of GDN / KDA, tuned for decode.

Decode is ``T == 1`` with a batch of sequences, so the loop is over time only and every step is a handful
of batched tensor ops over ``[N, H, K, V]``. Two reformulations cut the passes over the state per token
from five to three:

* the decay is folded into the reads: ``S'^T k = S^T (exp(g) * k)`` (KDA scales rows, i.e. key channels);
* the output is read from the *pre-update* state: ``o = S_new^T q = S'^T q + u (k . q)``, so the reads for
  ``k`` and ``q`` are one ``[2, K] @ [K, V]`` matmul against the same state.

The remaining passes are the decay, the rank-1 write, and that read. Without autograd the state is
updated in place (on a private copy; the caller's ``initial_state`` is never modified).
"""

from __future__ import annotations

import torch

from kernels.delta_rule.utils import DeltaRuleInputs, DeltaRuleOutput, VarlenLayout, delta_rule_op, fp32_scan

__all__ = ["recurrent_gated_delta_rule", "recurrent_kda", "recurrent_delta_rule"]


@fp32_scan
def recurrent_delta_rule(x: DeltaRuleInputs) -> DeltaRuleOutput:
    """Pure-PyTorch recurrence for both rules: ``g`` ``[B, T, H]`` (GDN) or ``[B, T, H, K]`` (KDA)."""
    _, T, H, K = x.k.shape
    V = x.v.shape[-1]
    q, k, v, g, beta = x.tensors
    layout = None
    if x.cu_seqlens is not None:
        layout = VarlenLayout(x.cu_seqlens, T, k.device)
        q, k, v, g, beta = (layout.pad(t) for t in x.tensors)
    N, L = k.shape[:2]
    f32 = torch.float32
    q, k, v, g, beta = q.to(f32), k.to(f32), v.to(f32), g.to(f32), beta.to(f32)
    decay = g.exp()  # g <= 0, so this never overflows
    if not x.per_channel:
        decay = decay[..., None]  # [N, L, H, 1]: broadcasts over key channels like KDA's per-channel decay
    q = q * x.scale
    if x.initial_state is None:
        S = torch.zeros(N, H, K, V, dtype=f32, device=k.device)
    else:
        # Never written in place: the first decay below makes a private (contiguous) copy.
        S = x.initial_state.to(f32).contiguous()
    grad = torch.is_grad_enabled() and any(a.requires_grad for a in (q, k, v, g, beta, S))
    outs = []
    # unbind, not a[:, t]: indexing in a loop costs a full-size zero-filled gradient per step in backward.
    steps = zip(*(a.unbind(1) for a in (q, k, v, decay, beta)), strict=True)
    for t, (q_t, k_t, v_t, d_t, b_t) in enumerate(steps):
        qk = torch.stack([q_t * d_t, k_t * d_t], dim=2)  # [N, H, 2, K]: reads of the decayed state
        reads = qk @ S  # [N, H, 2, V]
        u = b_t[..., None] * (v_t - reads[:, :, 1])  # [N, H, V]
        outs.append(reads[:, :, 0] + (q_t * k_t).sum(-1, keepdim=True) * u)
        # S' = decay * S, then the rank-1 write k u^T; in place (no [N, H, K, V] temporaries) unless autograd
        # needs the intermediate states.
        if grad or t == 0:
            S = S * d_t[..., None]
        else:
            S.mul_(d_t[..., None])
        kk, uu = k_t.reshape(N * H, K, 1), u.reshape(N * H, 1, V)
        if grad:
            S = torch.baddbmm(S.view(N * H, K, V), kk, uu).view(N, H, K, V)
        else:
            S.view(N * H, K, V).baddbmm_(kk, uu)
    o = torch.stack(outs, dim=1) if L else v.new_zeros(N, 0, H, V, dtype=f32)
    if layout is not None:
        o = layout.unpad(o)
    if L == 0 and x.initial_state is not None:
        S = S.clone()  # do not hand back the caller's own tensor
    return o.to(x.v.dtype), (S if x.output_final_state else None)


recurrent_gated_delta_rule = delta_rule_op(
    recurrent_delta_rule,
    name="recurrent_gated_delta_rule",
    per_channel=False,
    fla_op="recurrent_gdn",
    doc="""Gated DeltaNet, recurrent form (decode). ``g`` is the per-head log-decay ``[B, T, H]`` (<= 0).

    q, k must already be L2-normalised; ``scale`` (default ``K ** -0.5``) multiplies q. Returns
    ``(o [B, T, H, V] in v.dtype, final_state [N, H, K, V] fp32 or None)``. On CUDA with ``fla``
    installed this routes to fla's ``fused_recurrent_gated_delta_rule`` (untested here).
    """,
)

recurrent_kda = delta_rule_op(
    recurrent_delta_rule,
    name="recurrent_kda",
    per_channel=True,
    fla_op="recurrent_kda",
    doc="""Kimi Delta Attention, recurrent form (decode). ``g`` is the per-channel log-decay ``[B, T, H, K]``.

    Same contract as :func:`recurrent_gated_delta_rule`; on CUDA with ``fla`` installed this routes to
    fla's ``fused_recurrent_kda`` (untested here).
    """,
)
