"""One supernet layer's token mixing on vLLM's cache machinery, routed per token inside a custom op.

Each decoder layer registers a cache for every mixer that some served preset uses there, under its own layer
index (``caches.<mixer * num_layers + layer>.<mixer>``, as vLLM's hybrid models do), so every request owns the
cache its preset needs at every layer:

* FA and SWA hold a paged KV cache through vLLM's ``Attention`` layer (full-length for both: vLLM's
  sliding-window cache frees blocks that leave the window, which would drop SWA's attention sinks -- the
  first ``sinks`` positions that stay visible; vLLM's ``sinks`` argument is a different thing, learned
  per-head logits). The attention itself is ours (supernet.mixers.attention's mask and grouped SDPA), in the
  model's dtype, reading the blocks vLLM allocated.
* GDN and KDA are mamba-style state layers (``MambaBase``, GDN metadata: one state slot per request) holding
  the short-conv tail and the fp32 recurrent state; the math is the mixers' own ``forward`` (kernels/).

The per-layer dispatch (which rows run which mixer) lives in ``torch.ops.vllm.supernet_mix``: compiled graphs
see one opaque op per layer, so no routing is ever baked into a graph.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import (
    LayerNameType,
    _encode_layer_name,
    _resolve_layer_name,
    direct_register_custom_op,
)
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from serving.vllm.router import ROUTING
from supernet.cache import DeltaState
from supernet.config import MIXER_NAMES
from supernet.layers import apply_rotary
from supernet.mixers import MixerContext
from supernet.mixers.attention import Attention as AttentionMixer
from supernet.mixers.attention import attend_grouped, window_mask
from supernet.mixers.delta import DeltaMixer
from supernet.model import DecoderLayer


def cache_name(root: str, mixer: str, layer: int, num_layers: int) -> str:
    """vLLM orders caches by the one integer in a layer name, so each (mixer, layer) gets its own index."""
    return f"{root}caches.{MIXER_NAMES.index(mixer) * num_layers + layer}.{mixer}"


class DeltaStateCache(nn.Module, MambaBase):
    """A GDN/KDA state slot per request: conv tail [C, W-1] (model dtype) and recurrent state [H, K, V] fp32."""

    def __init__(self, conv_shape: tuple[int, int], state_shape: tuple[int, int, int], dtype, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.conv_shape, self.state_shape, self.dtype = conv_shape, state_shape, dtype
        self.kv_cache = (torch.tensor([]), torch.tensor([]))
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix}")
        context[prefix] = self

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.GDN_ATTN

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return (self.conv_shape, self.state_shape)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return (self.dtype, torch.float32)


class Step:
    """What every layer needs about the current batch, derived once per forward."""

    def __init__(self, metadata: dict, num_tokens: int) -> None:
        md = next(iter(metadata.values()))
        qsl = getattr(md, "query_start_loc", None)
        if qsl is None:
            qsl = md.non_spec_query_start_loc
        self.query_start_loc = qsl.to("cpu", torch.long)
        self.bounds = self.query_start_loc.tolist()
        self.mixers = ROUTING.token_mixers(self.query_start_loc, num_tokens)  # [layers, tokens]
        self.metadata = metadata

    def rows_using(self, layer: int, mixer_id: int) -> list[int]:
        """Batch rows whose preset runs ``mixer_id`` at ``layer`` (rows are never split across mixers)."""
        starts = self.bounds[:-1]
        col = self.mixers[layer]
        return [j for j, s in enumerate(starts) if s < self.bounds[j + 1] and int(col[s]) == mixer_id]


_STEP: dict[str, object] = {"key": None, "step": None}


def current_step(num_tokens: int) -> Step | None:
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # speculative decoding: [0] is the target model's
        metadata = metadata[0] if metadata else None
    if not metadata:
        return None  # profiling / warm-up run: no requests
    if _STEP["key"] is not metadata:
        _STEP["key"], _STEP["step"] = metadata, Step(metadata, num_tokens)
    return _STEP["step"]  # type: ignore[return-value]


class SupernetMixer(nn.Module):
    """The token-mixing half of one decoder layer: the layer's mixers (weights owned by the model) plus a
    cache per served mixer, dispatched per row through the ``supernet_mix`` op. Built after the model is cut
    for tensor parallelism, so the caches take the mixers' local head counts; the op's output is then this
    rank's partial sum, which the model all-reduces (``DecoderLayer.reduce``)."""

    layer: DecoderLayer  # set through __dict__ (not submodules: their weights are registered once, under the model)
    rotary: nn.Module

    def __init__(
        self,
        layer: DecoderLayer,
        rotary: nn.Module,
        index: int,
        num_layers: int,
        mixers: tuple[str, ...],
        root: str,
        cache_config,
    ) -> None:
        super().__init__()
        self.__dict__["layer"], self.__dict__["rotary"] = layer, rotary
        self.index, self.mixers, self.prefix = index, mixers, f"{root}mixers.{index}"
        caches: dict[str, nn.Module] = {}
        self.cache_names: dict[str, str] = {}
        dtype = torch.get_default_dtype()
        for name in mixers:
            cname = self.cache_names[name] = cache_name(root, name, index, num_layers)
            if name in ("fa", "swa"):
                mixer = self.attention_mixer(name)
                caches[name] = Attention(
                    mixer.num_heads,
                    mixer.head_dim,
                    mixer.head_dim**-0.5,
                    mixer.num_kv_heads,
                    cache_config=cache_config,
                    prefix=cname,
                )
            else:
                delta = self.delta_mixer(name)
                width = delta.num_heads * delta.head_dim
                caches[name] = DeltaStateCache(
                    (3 * width, delta.conv_weight.shape[1] - 1),
                    (delta.num_heads, delta.head_dim, delta.head_dim),
                    dtype,
                    cname,
                )
        self.caches = nn.ModuleDict(caches)
        get_current_vllm_config().compilation_config.static_forward_context[self.prefix] = self

    def attention_mixer(self, name: str) -> AttentionMixer:
        return cast(AttentionMixer, self.layer.mixers[name])

    def delta_mixer(self, name: str) -> DeltaMixer:
        return cast(DeltaMixer, self.layer.mixers[name])

    def forward(self, h: Tensor, positions: Tensor) -> Tensor:
        out = torch.empty_like(h)
        torch.ops.vllm.supernet_mix(h, positions, out, _encode_layer_name(self.prefix))
        return out

    # -- the op body -------------------------------------------------------------------------------------------
    def mix(self, h: Tensor, positions: Tensor, out: Tensor) -> None:
        out.zero_()  # profiling runs (no requests) and padding tokens stay zero
        step = current_step(h.shape[0])
        if step is None:
            return
        for name in self.mixers:
            rows = step.rows_using(self.index, MIXER_NAMES.index(name))
            if not rows:
                continue
            metadata = step.metadata[self.cache_names[name]]
            if name in ("fa", "swa"):
                self._attention(name, rows, step, metadata, h, positions, out)
            else:
                self._delta(name, rows, step, metadata, h, out)

    def _attention(self, name, rows, step, metadata, h, positions, out) -> None:
        mixer, base = self.attention_mixer(name), self.layer.attn
        # [blocks, kv_heads, block_size, 2 * head_dim] (our own layout)
        cache = cast(Tensor, self.caches[name].kv_cache)
        d, bs = mixer.head_dim, cache.shape[2]
        bounds = step.bounds
        index = torch.cat([torch.arange(bounds[j], bounds[j + 1]) for j in rows])
        x, pos = h[index], positions[index].long()
        cos, sin = self._rotary(pos)
        q, k, v = mixer.proj.qkv(x[None], base)
        n = x.shape[0]
        q = apply_rotary(q.view(1, n, mixer.num_heads, d), cos, sin)[0]
        k = apply_rotary(k.view(1, n, mixer.num_kv_heads, d), cos, sin)[0]
        v = v.view(n, mixer.num_kv_heads, d)
        slots = metadata.slot_mapping[index].long()
        keep = slots >= 0  # padding slots (-1) are never written
        blocks, offsets = slots[keep] // bs, slots[keep] % bs
        cache[blocks, :, offsets, :d] = k[keep].to(cache.dtype)
        cache[blocks, :, offsets, d:] = v[keep].to(cache.dtype)
        outs, start = [], 0
        for j in rows:
            t = bounds[j + 1] - bounds[j]
            length = int(metadata.seq_lens[j])
            table = metadata.block_table[j, : (length + bs - 1) // bs].long()
            kv = cache[table].permute(1, 0, 2, 3).reshape(mixer.num_kv_heads, -1, 2 * d)[:, :length]
            q_j = q[start : start + t].transpose(0, 1)  # [heads, T, D]
            q_pos = pos[start : start + t]
            if mixer.window is None and t == 1:
                mask = None
            else:
                mask = window_mask(q_pos, torch.arange(length), mixer.window, mixer.sinks)
            outs.append(attend_grouped(q_j, kv[..., :d], kv[..., d:], mask).transpose(0, 1).reshape(t, -1))
            start += t
        o = mixer.proj.out(torch.cat(outs)[None], base)[0]
        out[index] = o.to(out.dtype)

    def _rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rotary(positions[None])

    def _delta(self, name, rows, step, metadata, h, out) -> None:
        mixer, base = self.delta_mixer(name), self.layer.attn
        conv_cache, state_cache = cast(tuple[Tensor, Tensor], self.caches[name].kv_cache)
        bounds = step.bounds
        slots = metadata.non_spec_state_indices_tensor
        initial = metadata.has_initial_state
        ctx = MixerContext(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1), torch.zeros(1))  # unused by GDN/KDA
        decodes = [j for j in rows if bounds[j + 1] - bounds[j] == 1 and (initial is None or bool(initial[j]))]
        groups = [decodes] if decodes else []
        groups += [[j] for j in rows if j not in decodes]
        for group in groups:
            slot = [int(slots[j]) for j in group]
            states = []
            for j, s in zip(group, slot, strict=True):
                if initial is None or bool(initial[j]):
                    states.append(DeltaState(conv_cache[s], state_cache[s]))
                else:
                    states.append(cast(DeltaState, mixer.new_state(conv_cache.dtype, conv_cache.device)))
            index = torch.cat([torch.arange(bounds[j], bounds[j + 1]) for j in group])
            x = h[index].view(len(group), -1, h.shape[-1])
            y = mixer(x, base, ctx, states)
            out[index] = y.reshape(-1, h.shape[-1]).to(out.dtype)
            for state, s in zip(states, slot, strict=True):
                conv_cache[s].copy_(state.conv)
                state_cache[s].copy_(state.recurrent)


def supernet_mix(hidden: Tensor, positions: Tensor, out: Tensor, layer_name: LayerNameType) -> None:
    layer = get_forward_context().no_compile_layers[_resolve_layer_name(layer_name)]
    with torch.no_grad():
        layer.mix(hidden, positions, out)


def supernet_mix_fake(hidden: Tensor, positions: Tensor, out: Tensor, layer_name: LayerNameType) -> None:
    return None


direct_register_custom_op(
    op_name="supernet_mix", op_func=supernet_mix, mutates_args=["out"], fake_impl=supernet_mix_fake
)
