"""Causal depthwise 1-D convolution (the short conv in front of q, k, v of GDN/KDA).

Layout is token-major ``[B, T, C]`` (what the projections produce), and the convolution is written as
``W`` shifted multiply-adds instead of ``F.conv1d``: with ``W = 4`` that is four fused passes over the
input with no transposes, it is trivially differentiable, and it makes the decode path
(:func:`causal_conv1d_update`) the same arithmetic as prefill, so prefill followed by decode reproduces
a single long prefill exactly.

State convention (shared with the serving cache): ``[B, C, W - 1]``, the last ``W - 1`` *inputs*
(pre-activation, pre-conv), oldest first, zeros before the start of the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d", "causal_conv1d_update"]


def _activate(y: Tensor, activation: str | None) -> Tensor:
    if activation in ("silu", "swish"):
        return F.silu(y)
    if activation is None:
        return y
    raise ValueError(f"unsupported activation {activation!r} (use 'silu' or None)")


def _conv_valid(ext: Tensor, weight: Tensor, bias: Tensor | None, T: int) -> Tensor:
    """Valid (no padding) depthwise conv over ``ext [B, T + W - 1, C]`` -> ``[B, T, C]`` in fp32."""
    W = weight.shape[-1]
    # Each tap's weights contiguous ([W, C]): a strided column of [C, W] made every pass ~3x slower on CPU. The
    # passes accumulate in place into one buffer: a fresh multi-MB result per pass page-faults on every call
    # (a 256-token prefill chunk of SmolLM2's GDN conv: 0.34 vs ~1 ms). Autograd needs none of the overwritten
    # values (each pass saves only its own inputs).
    w = weight.float().t().contiguous()
    y = ext[:, 0:T] * w[0]
    for i in range(1, W):
        y.addcmul_(ext[:, i : i + T], w[i])
    if bias is not None:
        y += bias.float()
    return y


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Prefill: ``y[t] = act(bias + sum_i weight[:, i] * x[t - W + 1 + i])`` per channel.

    Args:
        x: ``[B, T, C]``.
        weight: ``[C, W]`` depthwise kernel (``weight[:, -1]`` multiplies the current token).
        bias: optional ``[C]``.
        activation: ``"silu"`` or ``None``.
        initial_state: optional ``[N, C, W - 1]`` previous inputs (N = B, or number of sequences with
            ``cu_seqlens``); zeros when omitted.
        output_final_state: also return the last ``W - 1`` inputs, ``[N, C, W - 1]`` in ``x.dtype``.
        cu_seqlens: optional ``[N + 1]`` cumulative lengths of sequences packed in ``x`` (``B == 1``);
            each sequence starts from its own state row, so no token sees the previous sequence.

    Returns:
        ``(y [B, T, C] in x.dtype, final_state or None)``.
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    if cu_seqlens is None:
        if initial_state is None:
            prefix = x.new_zeros(B, W - 1, C, dtype=torch.float32)
        else:
            prefix = initial_state.float().transpose(1, 2)
        ext = torch.cat([prefix, x.float()], dim=1)  # [B, W-1+T, C]
        y = _activate(_conv_valid(ext, weight, bias, T), activation).to(x.dtype)
        final = ext[:, ext.shape[1] - (W - 1) :].transpose(1, 2).to(x.dtype) if output_final_state else None
        return y, final

    # Varlen: give every sequence its own W-1 columns of prefix (its initial state or zeros) in one extended
    # buffer, convolve the whole buffer once, and gather back the outputs that belong to real tokens. This
    # keeps it one vectorised pass however many sequences there are.
    if B != 1:
        raise ValueError("cu_seqlens requires x packed as B == 1")
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    N = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    seq_of_tok = torch.repeat_interleave(torch.arange(N, device=x.device), lens)  # [T]
    ext_tok_pos = torch.arange(T, device=x.device) + (seq_of_tok + 1) * (W - 1)  # where token t sits in ext
    ext_start = cu[:-1] + torch.arange(N, device=x.device) * (W - 1)  # first prefix column of each sequence
    L = T + N * (W - 1)
    if initial_state is None:
        prefix = x.new_zeros(N, W - 1, C, dtype=torch.float32)
    else:
        prefix = initial_state.float().transpose(1, 2)
    pre_pos = (ext_start[:, None] + torch.arange(W - 1, device=x.device)).reshape(-1)
    ext = x.new_zeros(L, C, dtype=torch.float32)
    ext = ext.index_copy(0, ext_tok_pos, x[0].float()).index_copy(0, pre_pos, prefix.reshape(-1, C))
    ext = ext.unsqueeze(0)
    y_all = _activate(_conv_valid(ext, weight, bias, L - (W - 1)), activation)  # output j uses ext[j..j+W-1]
    y = y_all[0].index_select(0, ext_tok_pos - (W - 1)).unsqueeze(0).to(x.dtype)
    final = None
    if output_final_state:
        # The last W-1 columns of each sequence's segment (prefix + tokens), which ends at ext_start+len+W-1.
        end = ext_start + lens + (W - 1)
        pos = (end[:, None] - (W - 1) + torch.arange(W - 1, device=x.device)).reshape(-1)
        final = ext[0].index_select(0, pos).reshape(N, W - 1, C).transpose(1, 2).to(x.dtype)
    return y, final


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Decode step(s): convolve ``x`` continuing from ``conv_state``; returns ``(y, new_state)``.

    Args:
        x: ``[B, C]`` (one token) or ``[B, T, C]`` (a few tokens, e.g. speculative drafts).
        conv_state: ``[B, C, W - 1]`` last inputs; it is *not* modified (a new state is returned), so a
            caller can keep the old one to roll back rejected draft tokens.

    Returns:
        ``y`` with the shape and dtype of ``x``, and ``new_state [B, C, W - 1]`` in ``conv_state.dtype``.
    """
    single = x.dim() == 2
    xs = x.unsqueeze(1) if single else x
    T = xs.shape[1]
    W = weight.shape[-1]
    ext = torch.cat([conv_state.float().transpose(1, 2), xs.float()], dim=1)
    y = _activate(_conv_valid(ext, weight, bias, T), activation).to(x.dtype)
    new_state = ext[:, ext.shape[1] - (W - 1) :].transpose(1, 2).to(conv_state.dtype).contiguous()
    return (y.squeeze(1) if single else y), new_state
