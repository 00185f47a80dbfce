"""Softmax attention mixers: FA (the teacher's attention exactly) and SWA (a window plus attention sinks)."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu as cpu_kernels
from supernet.cache import KVCache, LayerState, WindowKVCache, batched_rows
from supernet.config import AttentionConfig, SupernetConfig
from supernet.fastpath import fast_path_enabled
from supernet.layers import AttentionProjections, apply_rotary
from supernet.mixers.base import Mixer, MixerContext, MixerProjections


def window_mask(q_pos: Tensor, k_pos: Tensor, window: int | None, sinks: int) -> Tensor:
    """Boolean [Tq, Tk] mask: causal, and for a window the last ``window`` positions plus the first ``sinks``.
    Empty cache slots carry position -1 and are masked out."""
    q, k = q_pos[:, None], k_pos[None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= (q - k < window) | (k < sinks)
    return mask


def attend_grouped(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """One sequence's attention without materialising repeated KV heads.

    q [H, T, D], k/v [Hkv, L, D], mask [T, L] or None (all visible). Query heads of a group are stacked along the
    token axis so each KV head is read once: the decode step is bound by reading the cache, not by FLOPs."""
    num_heads, t, d = q.shape
    groups = num_heads // k.shape[0]
    qg = q.reshape(k.shape[0], groups * t, d)
    if mask is not None:
        mask = mask.repeat(groups, 1)
    out = F.scaled_dot_product_attention(qg.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask)
    return out.reshape(num_heads, t, d)


class Attention(Mixer):
    """FA when ``acfg.window`` is None, SWA otherwise. Both rotate q/k exactly like the Llama-family teacher."""

    def __init__(
        self, name: str, config: SupernetConfig, acfg: AttentionConfig, *, own: bool, lora_rank: int
    ) -> None:
        super().__init__(name)
        self.num_heads, self.num_kv_heads, self.head_dim = acfg.num_heads, acfg.num_kv_heads, acfg.head_dim
        self.window, self.sinks = acfg.window, acfg.sinks
        self.proj = MixerProjections.of(config.hidden_size, acfg, own=own, lora_rank=lora_rank)

    def forward(
        self, x: Tensor, base: AttentionProjections | None, ctx: MixerContext, states: list[LayerState] | None
    ) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.proj.qkv(x, base)
        if states is not None and t == 1 and self._kernel_serves(q, k, v, states):
            return self.proj.out(self._kernel_decode(q, k, v, ctx, states), base)
        # q and k rotate as one tensor: half the small ops of two calls, which a decode step pays per layer
        qk = torch.cat((q, k), dim=-1).view(b, t, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(qk, ctx.cos, ctx.sin).split([self.num_heads, self.num_kv_heads], dim=2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if states is None:
            out = self._full_sequence(q, k, v, ctx.positions[0])
        elif self.window is not None and t == 1 and fast_path_enabled() and not torch.is_grad_enabled():
            out = self._window_decode(q, k, v, ctx.positions[:, 0], states)
        else:
            out = torch.stack(
                [self._with_cache(q[i], k[i], v[i], ctx.positions[i], states[i]) for i in range(b)]
            )
        return self.proj.out(out.transpose(1, 2).reshape(b, t, -1), base)

    def _kernel_serves(self, q: Tensor, k: Tensor, v: Tensor, states: list[LayerState]) -> bool:
        """Whether this decode step can run on the C kernel (kernels/cpu): fast path on, no autograd, fp32 CPU
        tensors with contiguous rows, and every row's cache of this mixer's kind in fp32."""
        if not fast_path_enabled() or torch.is_grad_enabled() or q.dtype != torch.float32 or q.device.type != "cpu":
            return False
        if cpu_kernels.library() is None or not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
            return False
        if self.num_heads // self.num_kv_heads > cpu_kernels.MAX_QUERY_GROUPS or self.head_dim % 2:
            return False
        kind, d = (KVCache if self.window is None else WindowKVCache), self.head_dim
        return all(
            type(s) is kind and s.k.dtype == s.v.dtype == torch.float32 and s.k.stride() == s.v.stride()
            and s.k.stride()[1:] == (d, 1) and (kind is KVCache or cast(WindowKVCache, s).pos.is_contiguous())
            for s in states
        )

    def _kernel_decode(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: MixerContext, states: list[LayerState]
    ) -> Tensor:
        """One token per row through the C kernel: rotary, the cache writes and the attention of every row in
        one call (the reference path below does the same in ~20 torch ops per row). q [B, 1, H*D], k/v
        [B, 1, Hkv*D]; returns [B, 1, H*D], the output projection's input."""
        lib = cast(Any, cpu_kernels.library())  # _kernel_serves checked it
        b = q.shape[0]
        out = q.new_empty(b, self.num_heads * self.head_dim)
        positions = ctx.positions[:, 0].tolist()
        caches, rings = [], []
        for state, pos in zip(states, positions, strict=True):
            cache = cast(KVCache | WindowKVCache, state)  # _kernel_serves checked the kinds
            if isinstance(cache, KVCache):
                slot = cache.length
                cache.ensure(slot + 1)
                cache.length = n_attend = slot + 1
            else:
                slot = cache.slot(pos)
                rings.append((cache.pos, pos))  # the kernel records the slot's new position
                # every filled slot is visible: before the ring is full it holds positions 0..pos, after that
                # exactly the sinks and the last ``window`` positions (see _with_cache)
                n_attend = min(pos + 1, cache.k.shape[1])
            caches.append((cache.k, cache.v, slot, n_attend))
        cpu_kernels.attention_decode(
            lib, q[:, 0], k[:, 0], v[:, 0], ctx.cos[:, 0], ctx.sin[:, 0], caches, self.head_dim**-0.5, out,
            rings or None,
        )
        return out.view(b, 1, -1)

    def _full_sequence(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        if self.window is None or self.window >= q.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        mask = window_mask(positions, positions, self.window, self.sinks)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def _with_cache(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, state: LayerState) -> Tensor:
        if isinstance(state, KVCache):
            k_all, v_all = state.append(k, v)
            if q.shape[1] == 1:
                return attend_grouped(q, k_all, v_all, None)
            k_pos = torch.arange(k_all.shape[1], device=q.device)
            return attend_grouped(q, k_all, v_all, window_mask(positions, k_pos, None, 0))
        assert isinstance(state, WindowKVCache)
        window = cast(int, self.window)  # only SWA makes a WindowKVCache
        if q.shape[1] == 1:
            # Decode: write the token into its ring slot first, then attend over the ring in place. The slot's
            # previous occupant (position p - window) is exactly the key that just left the window, so the
            # visible set is unchanged -- and no [sinks + window] concatenation is copied per layer per step.
            pos = state.store_one(k, v, int(positions[0]))
            mask = (state.pos >= 0) & ((pos - state.pos < window) | (state.pos < self.sinks))
            return attend_grouped(q, state.k, state.v, mask[None, :])
        k_all, v_all, k_pos = state.gather(k, v, positions)
        out = attend_grouped(q, k_all, v_all, window_mask(positions, k_pos, window, self.sinks))
        state.store(k, v, positions)
        return out

    def _window_decode(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, states: list[LayerState]) -> Tensor:
        """SWA decode fast path: every row's ring has the same shape, so the rows' rings live as views of
        persistent batch tensors (supernet.cache.batched_rows) and one write + one attention call serve the
        whole batch -- the per-row ``_with_cache`` step, batched. q [B, H, 1, D], k/v [B, Hkv, 1, D]."""
        b, hkv = k.shape[:2]
        window = cast(int, self.window)  # taken only for SWA
        ring_k, ring_v, ring_pos = batched_rows(self.__dict__.setdefault("_decode_rows", {}), states,
                                                ("k", "v", "pos"))
        slot = torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % window)
        rows = torch.arange(b, device=q.device)
        ring_k[rows, :, slot] = k[:, :, 0]
        ring_v[rows, :, slot] = v[:, :, 0]
        ring_pos[rows, slot] = pos
        qg = q.reshape(b, hkv, -1, self.head_dim)  # query heads of a group stacked: each KV head read once
        if int(pos.min()) >= self.sinks + window - 1:
            # Every ring is full: its slots hold exactly the sinks and the last ``window`` positions, all
            # visible, so no mask is needed (the common case past the first window of a sequence).
            return F.scaled_dot_product_attention(qg, ring_k, ring_v).reshape(q.shape)
        p = pos[:, None]
        mask = (ring_pos >= 0) & ((p - ring_pos < window) | (ring_pos < self.sinks))
        out = F.scaled_dot_product_attention(qg, ring_k, ring_v, attn_mask=mask[:, None, None, :])
        return out.reshape(q.shape)

    def new_state(self, dtype: torch.dtype, device: torch.device) -> LayerState:
        if self.window is None:
            return KVCache.empty(self.num_kv_heads, self.head_dim, dtype, device)
        return WindowKVCache.empty(self.num_kv_heads, self.head_dim, self.sinks, self.window, dtype, device)
