"""The decode step (one token per row) as a straight run of kernel calls, where the CPU kernels serve it.

With the C kernels doing the arithmetic (kernels/cpu), a batch-1 step of the demo model still spent 7-10 ms of
~30 in Python: ~15 module calls per layer, a cache-key check of every derived weight on every call, and small
torch ops (splits, residual adds, the MLP's activation, temporaries). This runs the same math -- the same
prepared weights (kernels.linear.PreparedLinear), the same kernels, the mixers' own decode helpers -- as one
loop over the layers: the weights are looked up once and reused while their sources are unchanged (checked per
step by the same key ``kernels.linear.derived`` checks per call), the residual adds happen inside the
output products, and the MLP's activation is one kernel call.

It serves a step when every piece of it has a kernel: fp32 on CPU, one torch thread (the product kernel is
single-threaded), the C kernels built, at most ``BLOCKED_MAX_ROWS`` rows, an unsharded model, the fast path on
and no autograd. A mixer group the kernels do not serve within such a step (a speculative window open on a
GDN/KDA state, a cache of another dtype) runs the mixer's own forward for its rows. ``SupernetForCausalLM``
calls ``serves`` and ``step``; tests pin the result to the reference path (tests/core/test_fast_decode.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from kernels import cpu as cpu_kernels
from kernels.linear import BLOCKED_MAX_ROWS, PreparedLinear, prepare_fused, sources_key
from supernet.cache import DeltaState, LayerState, SequenceState
from supernet.fastpath import fast_path_enabled
from supernet.layers import AttentionProjections
from supernet.mixers.attention import Attention
from supernet.mixers.base import MixerContext
from supernet.mixers.delta import DeltaMixer
from supernet.mixers.delta_decode import DecodeProjection, KernelWeights, decode_projection, kernel_step, kernel_weights

if TYPE_CHECKING:
    from supernet.model import DecoderLayer, SupernetForCausalLM


@dataclass
class _Entry:
    """Prepared weights of one piece of the step, with the key of the parameters they came from
    (``kernels.linear.sources_key``, what the prepared weights' own caches compare)."""

    params: list[Tensor]
    key: tuple = field(init=False)

    def __post_init__(self) -> None:
        self.key = sources_key(self.params)

    def valid(self) -> bool:
        return sources_key(self.params) == self.key


@dataclass
class _Trunk(_Entry):
    """A layer's norms and MLP."""

    norm_in: Tensor
    norm_post: Tensor
    eps: float
    gate_up: PreparedLinear
    down: PreparedLinear


@dataclass
class _AttentionPlan(_Entry):
    qkv: PreparedLinear
    sizes: list[int]
    out: PreparedLinear


@dataclass
class _DeltaPlan(_Entry):
    projection: DecodeProjection
    kernel: KernelWeights
    out: PreparedLinear


@dataclass
class _Head(_Entry):
    norm: Tensor
    eps: float
    head: PreparedLinear


def serves(model: SupernetForCausalLM, input_ids: Tensor, states: Sequence[SequenceState]) -> bool:
    """Whether ``step`` runs this decode step (see the module docstring)."""
    from supernet.model import no_reduce  # (supernet.model imports this module)

    weight = model.embed_tokens.weight
    return (
        input_ids.shape[1] == 1
        and input_ids.shape[0] <= BLOCKED_MAX_ROWS
        and fast_path_enabled()
        and not torch.is_grad_enabled()
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and torch.get_num_threads() == 1
        and cpu_kernels.library() is not None
        and all(layer.reduce is no_reduce for layer in model.layers)  # not tensor-parallel
    )


def step(model: SupernetForCausalLM, input_ids: Tensor, states: Sequence[SequenceState]) -> Tensor:
    """Logits [B, 1, vocab] of one decode step; the rows' states advance in place (``serves`` was checked)."""
    lib = cast(Any, cpu_kernels.library())  # serves() checked it
    b = input_ids.shape[0]
    start = torch.tensor([s.length for s in states])
    positions = start[:, None]
    cos, sin = model.rotary(positions)
    ctx = MixerContext(positions, cos, sin)
    x = model.embed_tokens.weight[input_ids[:, 0]]  # [B, hidden], a new tensor the step adds into
    h = torch.empty_like(x)
    hidden = x.shape[1]
    placements = [s.placement for s in states]
    for i in range(len(model.layers)):
        trunk = _trunk(model, i)
        lib.rms_norm_f32(x.data_ptr(), trunk.norm_in.data_ptr(), trunk.eps, b, hidden, h.data_ptr())
        names = [p[i] for p in placements]
        if all(n == names[0] for n in names):
            _mix(model, i, names[0], h, x, ctx, [s.layers[i] for s in states])
        else:
            for name in dict.fromkeys(names):
                rows = [r for r, n in enumerate(names) if n == name]
                index = torch.tensor(rows)
                part = x[index]
                _mix(model, i, name, h[index], part, ctx.rows(index), [states[r].layers[i] for r in rows])
                x[index] = part
        lib.rms_norm_f32(x.data_ptr(), trunk.norm_post.data_ptr(), trunk.eps, b, hidden, h.data_ptr())
        trunk.down(cpu_kernels.silu_mul(lib, trunk.gate_up(h)), add_to=x)
    for s in states:
        s.length += 1
    head = _head(model)
    lib.rms_norm_f32(x.data_ptr(), head.norm.data_ptr(), head.eps, b, hidden, h.data_ptr())
    return head.head(h).view(b, 1, -1)


def _mix(
    model: SupernetForCausalLM, i: int, name: str, h: Tensor, x: Tensor, ctx: MixerContext, states: list[LayerState]
) -> None:
    """x += layer i's mixer ``name`` of its normed input h, for rows whose states are ``states``."""
    layer = cast("DecoderLayer", model.layers[i])
    mixer = layer.mixers[name]
    plan = _mixer_plan(model, i, name)
    if isinstance(plan, _AttentionPlan):
        attention = cast(Attention, mixer)
        q, k, v = plan.qkv(h).unsqueeze(1).split(plan.sizes, dim=-1)  # [B, 1, width], as the mixer has them
        if attention._kernel_serves(q, k, v, states):
            plan.out(attention._kernel_decode(q, k, v, ctx, states).view(h.shape[0], -1), add_to=x)
            return
    elif all(cast(DeltaState, s).history is None for s in states):
        o = kernel_step(mixer, plan.projection.inputs(h), cast("list[DeltaState]", states), plan.kernel)
        if o is not None:
            plan.out(o, add_to=x)
            return
    x += mixer(h[:, None], layer.attn, ctx, states)[:, 0]  # the mixer's own path (see the module docstring)


def _cache(model: SupernetForCausalLM) -> dict:
    return model.__dict__.setdefault("_decode_program", {})


def _trunk(model: SupernetForCausalLM, i: int) -> _Trunk:
    cache = _cache(model)
    entry = cache.get(("trunk", i))
    if entry is None or not entry.valid():
        layer = cast("DecoderLayer", model.layers[i])
        mlp = layer.mlp
        params: list[Tensor] = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                *mlp.parameters()]
        entry = cache[("trunk", i)] = _Trunk(
            params, layer.input_layernorm.weight.detach().contiguous(),
            layer.post_attention_layernorm.weight.detach().contiguous(),
            layer.input_layernorm.eps, mlp.prepared_gate_up(), mlp.down_proj.prepared(),
        )
    return entry


def _mixer_plan(model: SupernetForCausalLM, i: int, name: str) -> _AttentionPlan | _DeltaPlan:
    cache = _cache(model)
    entry = cache.get((name, i))
    if entry is None or not entry.valid():
        layer = cast("DecoderLayer", model.layers[i])
        mixer = layer.mixers[name]
        base = layer.attn
        params: list[Tensor] = [*mixer.parameters(), *(base.parameters() if base is not None else ())]
        if isinstance(mixer, Attention):
            qkv = mixer.proj.prepared_qkv(base)
            assert qkv is not None  # attention mixers never tile their KV heads
            projs = cast(AttentionProjections, mixer.proj.own if mixer.proj.own is not None else base)
            sizes = [p.out_features for p in (projs.q_proj, projs.k_proj, projs.v_proj)]
            entry = _AttentionPlan(params, qkv, sizes, mixer.proj.prepared_out(base))
        else:
            assert isinstance(mixer, DeltaMixer)
            projection = decode_projection(mixer, base)
            entry = _DeltaPlan(
                params, projection, kernel_weights(mixer, projection.lora_b), mixer.proj.prepared_out(base)
            )
        cache[(name, i)] = entry
    return entry


def _head(model: SupernetForCausalLM) -> _Head:
    cache = _cache(model)
    entry = cache.get("head")
    if entry is None or not entry.valid():
        weight = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
        entry = cache["head"] = _Head(
            [weight, model.norm.weight], model.norm.weight.detach().contiguous(), model.norm.eps,
            prepare_fused(model, "head", [weight]),
        )
    return entry
