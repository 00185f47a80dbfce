"""One decode token of GDN / KDA for a batch of sequences, updating their states in place.

The general forms (:mod:`kernels.conv`, :mod:`kernels.delta_rule.recurrent`) never modify the caller's
states, so every decode step used to copy each state twice per layer (stack the rows' states, then a private
copy before the first in-place op) on top of the passes the math needs. A decode engine owns its states and
moves them forward one token at a time; these functions do just that, in place, with the minimum passes:

* ``conv_step_``: the short causal convolution of one token -- the stored inputs and the new one as one
  ``[N, C, W]`` window, one multiply and one sum against the weights, then one copy shifts the state (four ops
  whatever ``W``: a decode step pays them per layer, so their count matters more than their arithmetic);
* ``delta_rule_step_``: decay the state (one read-write pass), read ``S^T q`` and ``S^T k`` together (one read
  pass: a ``[2, K] @ [K, V]`` matmul per head), and the rank-1 write ``S += k u^T`` (one read-write pass).

Same arithmetic as the recurrent form up to fp32 rounding (tests/kernels/test_decode_step.py pins it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["conv_step_", "delta_rule_step_"]


def conv_step_(x: Tensor, conv_state: Tensor, weight: Tensor, activation: str | None = "silu") -> Tensor:
    """Causal depthwise conv of one new token per row, shifting ``conv_state`` in place.

    Args:
        x: ``[N, C]`` the new inputs (pre-conv).
        conv_state: ``[N, C, W - 1]`` the previous ``W - 1`` inputs, oldest first (the layout of
            :func:`kernels.causal_conv1d_update`); updated in place to end with ``x``.
        weight: ``[C, W]`` (``weight[:, -1]`` multiplies the new token).

    Returns:
        ``act(conv)`` as ``[N, C]`` fp32.
    """
    window = torch.cat((conv_state, x.to(conv_state.dtype)[:, :, None]), dim=-1)  # [N, C, W], oldest first
    y = (window.float() * weight.float()).sum(-1)
    conv_state.copy_(window[:, :, 1:])  # one shift of the whole state, not W - 1 column copies
    if activation in ("silu", "swish"):
        return F.silu(y)
    if activation is None:
        return y
    raise ValueError(f"unsupported activation {activation!r} (use 'silu' or None)")


def delta_rule_step_(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, scale: float | None = None
) -> Tensor:
    """One gated delta-rule step per row, updating ``state`` in place.

    Args:
        q, k: ``[N, H, K]``, already L2-normalised; ``v``: ``[N, H, V]``.
        g: log-decay ``<= 0``, ``[N, H]`` (GDN, one per head) or ``[N, H, K]`` (KDA, one per key channel).
        beta: ``[N, H]``.
        state: ``[N, H, K, V]`` fp32, contiguous; becomes ``exp(g) S + k u^T``.
        scale: multiplies q (default ``K ** -0.5``).

    Returns:
        ``o = S_new^T (scale q)`` as ``[N, H, V]`` fp32.
    """
    n, h, dk = k.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    f32 = torch.float32
    q, k, v, beta = q.to(f32) * scale, k.to(f32), v.to(f32), beta.to(f32)
    decay = g.to(f32).exp()
    state.mul_(decay[..., None, None] if g.dim() == 2 else decay[..., None])
    reads = torch.stack((q, k), dim=2) @ state  # [N, H, 2, V]: S'^T q and S'^T k in one pass
    u = beta[..., None] * (v - reads[:, :, 1])
    # o = S_new^T q = S'^T q + u (k . q): read from the decayed state, before the write
    o = torch.addcmul(reads[:, :, 0], (q * k).sum(-1, keepdim=True), u)
    state.view(n * h, dk, dv).baddbmm_(k.reshape(n * h, dk, 1), u.reshape(n * h, 1, dv))
    return o
