"""Building blocks shared by every mixer: norms, the MLP, rotary embeddings and q/k/v/o projections."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import rms_norm
from kernels.linear import PreparedLinear, linear, prepare_fused, use_packed


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same math) whose few-row, no-grad calls -- decode steps -- use weights
    prepacked for oneDNN (kernels/linear.py). Training and prefill run exactly ``F.linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self)

    def prepared(self) -> PreparedLinear:
        """This projection prepared for decode products (the cache ``forward``'s packed calls use)."""
        return prepare_fused(self, "weight", [self.weight], [self.bias])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """The Llama/Mistral/Qwen2 gated SiLU MLP, shared by all mixers of a layer."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if use_packed(x):  # decode: gate and up read the same input, so they run as one packed matrix
            gate, up = self.prepared_gate_up()(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def prepared_gate_up(self) -> PreparedLinear:
        """gate | up as one prepared weight: they read the same input."""
        return prepare_fused(
            self, "gate_up", [self.gate_proj.weight, self.up_proj.weight], [self.gate_proj.bias, self.up_proj.bias]
        )


class RotaryEmbedding(nn.Module):
    """Rotary position embedding. Non-default rope types (llama3, yarn, ...) take their frequencies from
    transformers' own ``ROPE_INIT_FUNCTIONS`` so a converted model rotates exactly like its teacher."""

    inv_freq: Tensor  # a buffer (register_buffer), so declared for the type checker

    def __init__(self, head_dim: int, rope_parameters: dict[str, Any], max_positions: int) -> None:
        super().__init__()
        rope_type = rope_parameters.get("rope_type", "default")
        theta = float(rope_parameters.get("rope_theta", 10000.0))
        if rope_type == "default":
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
            scaling = 1.0
        else:
            from transformers import LlamaConfig
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(
                    f"rope_type {rope_type!r} is not supported; known: {sorted(ROPE_INIT_FUNCTIONS)}"
                )
            cfg = LlamaConfig(
                head_dim=head_dim,
                hidden_size=head_dim,
                num_attention_heads=1,
                max_position_embeddings=max_positions,
                rope_parameters=dict(rope_parameters),
            )
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
        self.attention_scaling = float(scaling)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin of shape [B, T, head_dim] for integer positions [B, T]."""
        freqs = positions.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D]; cos/sin [B, T, D] (rotate-half convention, as Llama)."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class AttentionProjections(nn.Module):
    """The q/k/v/o projections of one attention block (the teacher's layout: GQA, optional qkv bias)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool) -> None:
        super().__init__()
        self.q_proj = Linear(hidden, num_heads * head_dim, bias=bias)
        self.k_proj = Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(num_heads * head_dim, hidden, bias=False)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of x; on the decode path as one packed matrix (they read the same input)."""
        if not use_packed(x):
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        y = self.prepared_qkv()(x)
        return y.split([p.out_features for p in (self.q_proj, self.k_proj, self.v_proj)], dim=-1)

    def prepared_qkv(self) -> PreparedLinear:
        """q | k | v as one prepared weight: they read the same input."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        return prepare_fused(self, "qkv", [p.weight for p in projs], [p.bias for p in projs])


class LoRA(nn.Module):
    """A low-rank delta ``B @ A`` added to a frozen projection. B starts at zero so the adapted projection starts
    exactly at the teacher's."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return linear(linear(x, self.A, None, self, "A"), self.B, None, self, "B")


def repeat_heads(x: Tensor, head_dim: int, repeats: int) -> Tensor:
    """[..., Hkv*D] -> [..., Hkv*repeats*D], repeating each KV head in place (GQA tiling: KV head h serves query
    heads h*repeats .. h*repeats+repeats-1, the grouping Llama's repeat_kv uses)."""
    if repeats == 1:
        return x
    return x.unflatten(-1, (-1, head_dim)).repeat_interleave(repeats, dim=-2).flatten(-2)
