"""What every mixer shares: the call interface, the per-call context, and how q/k/v/o weights are held."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.linear import PreparedLinear, derived, fused_linear, prepare, use_packed
from supernet.cache import LayerState
from supernet.config import AttentionConfig
from supernet.layers import AttentionProjections, LoRA, repeat_heads


@dataclass
class MixerContext:
    """Per-call facts every mixer of every layer needs (computed once per model forward)."""

    positions: Tensor  # [B, T] absolute positions of the new tokens
    cos: Tensor  # [B, T, head_dim] rotary tables for those positions
    sin: Tensor

    def rows(self, index: Tensor) -> MixerContext:
        return MixerContext(self.positions[index], self.cos[index], self.sin[index])


class Mixer(nn.Module):
    """A token mixer: [B, T, hidden] -> [B, T, hidden].

    ``states`` is None for stateless full-sequence calls (training, scoring) or one state per batch row, which the
    mixer reads and updates in place (prefill chunks and decode steps). ``base`` is the layer's shared teacher
    projections in ``lora`` mode, None in ``full`` mode.
    """

    name: str

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(
        self, x: Tensor, base: AttentionProjections | None, ctx: MixerContext, states: list[LayerState] | None
    ) -> Tensor:
        raise NotImplementedError

    def new_state(self, dtype: torch.dtype, device: torch.device) -> LayerState:
        raise NotImplementedError


class MixerProjections(nn.Module):
    """q/k/v/o of one mixer, either owned outright (``own=True``) or the layer's frozen teacher projections plus
    LoRA deltas (``own=False``; rank 0 means exactly the teacher's, as FA uses them).

    ``kv_repeat`` tiles the teacher's KV heads for mixers without grouped KV (GDN/KDA use one key head per query
    head); the LoRA deltas act on the tiled output so the tiled heads can drift apart during training.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        *,
        own: bool,
        lora_rank: int,
        kv_repeat: int = 1,
    ) -> None:
        super().__init__()
        self.head_dim, self.kv_repeat = head_dim, kv_repeat
        q_dim, kv_dim = num_heads * head_dim, num_kv_heads * kv_repeat * head_dim
        self.own = (
            AttentionProjections(hidden, num_heads, num_kv_heads * kv_repeat, head_dim, bias) if own else None
        )
        self.lora = None
        if not own and lora_rank > 0:
            self.lora = nn.ModuleDict(
                {
                    "q": LoRA(hidden, q_dim, lora_rank),
                    "k": LoRA(hidden, kv_dim, lora_rank),
                    "v": LoRA(hidden, kv_dim, lora_rank),
                    "o": LoRA(q_dim, hidden, lora_rank),
                }
            )

    @classmethod
    def of(
        cls, hidden: int, heads: AttentionConfig, *, own: bool, lora_rank: int, kv_repeat: int = 1
    ) -> MixerProjections:
        """Projections shaped like the attention ``heads`` (a mixer's own section, or FA's for delta mixers)."""
        return cls(
            hidden,
            heads.num_heads,
            heads.num_kv_heads,
            heads.head_dim,
            heads.bias,
            own=own,
            lora_rank=lora_rank,
            kv_repeat=kv_repeat,
        )

    def qkv(self, x: Tensor, base: AttentionProjections | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.own is not None:
            return self.own.qkv(x)
        assert base is not None, "shared-weight mixers need the layer's teacher projections"
        if self.lora is not None and self.kv_repeat == 1 and use_packed(x):
            return self._merged_qkv(x, base)
        q, k, v = base.qkv(x)
        k = repeat_heads(k, self.head_dim, self.kv_repeat)
        v = repeat_heads(v, self.head_dim, self.kv_repeat)
        if self.lora is not None:
            if use_packed(x):  # decode: the three LoRA deltas as one A matrix and one block-diagonal B
                loras = cast("dict[str, LoRA]", self.lora)  # the ModuleDict built in __init__
                delta = self.lora_qkv_b(fused_linear(x, self, "lora_a", [loras[key].A for key in "qkv"]))
                dq, dk, dv = delta.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
                return q + dq, k + dk, v + dv
            q, k, v = q + self.lora["q"](x), k + self.lora["k"](x), v + self.lora["v"](x)
        return q, k, v

    def _merged_qkv(self, x: Tensor, base: AttentionProjections) -> tuple[Tensor, Tensor, Tensor]:
        """Decode: q/k/v from the teacher's weights with the LoRA deltas merged in, one packed matrix -- the
        same bytes as the teacher's q/k/v and one call instead of three. Only without KV tiling: a tiled
        (``kv_repeat`` > 1) merged k/v would read ``kv_repeat`` times the teacher's k/v bytes, more than the
        separate LoRA factors cost."""
        sizes = [p.out_features for p in (base.q_proj, base.k_proj, base.v_proj)]
        return self._prepared_merged_qkv(base)(x).split(sizes, dim=-1)

    def _prepared_merged_qkv(self, base: AttentionProjections) -> PreparedLinear:
        loras = cast("dict[str, LoRA]", self.lora)
        projs = (base.q_proj, base.k_proj, base.v_proj)

        def make() -> tuple[Tensor, Tensor | None]:
            w = torch.cat([p.weight + loras[key].B @ loras[key].A for p, key in zip(projs, "qkv", strict=True)])
            biases = [p.bias for p in projs]
            return w, None if biases[0] is None else torch.cat(cast("list[Tensor]", biases))

        sources = [
            t for p, key in zip(projs, "qkv", strict=True) for t in (p.weight, p.bias, loras[key].A, loras[key].B)
        ]
        return prepare(self, "merged_qkv", sources, make)

    def prepared_qkv(self, base: AttentionProjections | None) -> PreparedLinear | None:
        """q | k | v as one prepared weight, where they are one (attention mixers; not GDN/KDA's tiled LoRA
        form, whose decode projection is their own, see supernet.mixers.delta_decode)."""
        if self.own is not None:
            return self.own.prepared_qkv()
        base = cast(AttentionProjections, base)
        if self.lora is None:
            return base.prepared_qkv()
        return self._prepared_merged_qkv(base) if self.kv_repeat == 1 else None

    def lora_qkv_b(self, a: Tensor) -> Tensor:
        """The q, k and v LoRA B factors applied to the concatenated A outputs ``a`` [..., 3 * rank] at once:
        one batched matmul over the three stacked factors when they have one shape (GDN/KDA tile k/v to q's
        width), else one block-diagonal matrix (which reads its zero blocks too)."""
        factors = [cast("dict[str, LoRA]", self.lora)[key].B for key in "qkv"]
        if all(f.shape == factors[0].shape for f in factors):
            stacked = derived(self, "lora_b", factors, lambda: torch.stack([f.t() for f in factors]).contiguous())
            rows = a.reshape(-1, 3, stacked.shape[1]).transpose(0, 1)  # [3, N, rank]
            return torch.bmm(rows, stacked).transpose(0, 1).reshape(*a.shape[:-1], -1)
        block = derived(self, "lora_b", factors, lambda: torch.block_diag(*factors))
        return F.linear(a, block)

    def out(self, o: Tensor, base: AttentionProjections | None) -> Tensor:
        if self.own is not None:
            return self.own.o_proj(o)
        o_proj = cast(AttentionProjections, base).o_proj  # shared-weight mixers always get the teacher's
        if self.lora is None:
            return o_proj(o)
        if use_packed(o):  # decode: the delta merged into a packed copy (same bytes, one call instead of three)
            return self.prepared_out(base)(o)
        return o_proj(o) + self.lora["o"](o)

    def prepared_out(self, base: AttentionProjections | None) -> PreparedLinear:
        """The output projection prepared for decode products (a LoRA delta merged in)."""
        if self.own is not None:
            return self.own.o_proj.prepared()
        o_proj = cast(AttentionProjections, base).o_proj
        if self.lora is None:
            return o_proj.prepared()
        lora = cast(LoRA, self.lora["o"])
        sources = [o_proj.weight, lora.A, lora.B]
        return prepare(self, "merged_o", sources, lambda: (o_proj.weight + lora.B @ lora.A, None))
