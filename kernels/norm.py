"""Normalisation helpers shared by the GDN/KDA mixers.

All three compute in fp32 and cast back once at the end: the mixers run in bf16 on GPU, and a sum of squares
over 64-128 channels in bf16 loses enough precision to visibly move the L2-normalised keys, which then feed
a recurrence that amplifies the error over thousands of tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu as cpu_kernels

__all__ = ["l2_norm", "rms_norm", "gated_rms_norm"]


def l2_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(sum(x**2) + eps)`` over the last dim.

    ``eps`` is added inside the root (fla's convention, also what transformers' references use) rather than
    clamping the norm, so outputs match those kernels bit-for-bit in spirit, not just approximately.
    """
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dim (weight multiplied in fp32 too)."""
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        lib = cpu_kernels.library()
        if lib is not None and not torch.is_grad_enabled() and x.device.type == "cpu" and x.is_contiguous() \
                and (weight is None or weight.is_contiguous()):
            return cpu_kernels.rms_norm(lib, x, weight, eps)  # inference: one C call (kernels/cpu/norm.c)
        # already fp32: torch's fused op computes the same (bit-identical here) in one call instead of six
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def gated_rms_norm(
    x: Tensor, gate: Tensor, weight: Tensor | None, eps: float = 1e-6, activation: str | None = "silu"
) -> Tensor:
    """``rms_norm(x, weight) * act(gate)``: GDN's output gate uses SiLU, KDA's uses sigmoid.

    The gate is applied before the final cast so the normalised values are not rounded twice.
    """
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        y = F.rms_norm(x, x.shape[-1:], weight, eps)  # one fused call instead of five (see rms_norm)
    else:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = y * weight.float()
    gf = gate.float()
    if activation in ("silu", "swish"):
        y = y * F.silu(gf)
    elif activation == "sigmoid":
        y = y * torch.sigmoid(gf)
    elif activation is not None:
        raise ValueError(f"unsupported gate activation {activation!r} (use 'silu', 'sigmoid' or None)")
    else:
        y = y * gf
    return y.to(x.dtype)
