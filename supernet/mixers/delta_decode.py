"""The GDN/KDA decode step on the fast path: one token per row, states advanced in place.

``DeltaMixer.forward`` on the reference path stacks every row's conv and recurrent state into batch tensors,
runs the general (copying) kernels and hands each row a view of the results -- two full copies of every
state per layer per step. Here the batch tensors persist between steps: while the same rows come back in
the same order (steady-state decoding) their states are still the views this path handed out, so the step
updates the batch tensors in place (kernels/delta_rule/decode.py) and copies nothing. Any other batch (a row
joined or left, a state cloned or rolled back, a prefill in between) is restacked once, then stays in place.

Ownership is checked by identity (supernet.cache.batched_rows): a row's ``conv``/``recurrent`` must be the very
tensors this path stored there at its last step. Anything else -- ``SequenceState.clone()``, a speculative
rollback, a prefill chunk -- assigns new tensors, so a tensor someone else holds is never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import cpu as cpu_kernels
from kernels import gated_rms_norm, l2_norm
from kernels.delta_rule.decode import conv_step_, delta_rule_step_
from kernels.linear import PreparedLinear, derived, prepare, prepare_fused
from supernet.cache import DeltaState, batched_rows
from supernet.fastpath import fast_path_enabled


def use_fast_decode(x: Tensor, states: Sequence[DeltaState] | None) -> bool:
    """One token per row, no autograd, CPU, no open speculative window (those record every position)."""
    return (
        states is not None
        and x.shape[1] == 1
        and fast_path_enabled()
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and all(s.history is None for s in states)
    )


@dataclass
class StepInputs:
    """Everything a decode step reads from x [N, hidden], as the packed projection produces it."""

    q: Tensor  # [N, W]
    k: Tensor  # [N, Hkv * D]: the KV heads before tiling to the mixer's H heads
    v: Tensor
    k_lora: tuple[Tensor, Tensor] | None  # (A x [N, rank], B [W, rank]): k's delta on the tiled heads, or None
    v_lora: tuple[Tensor, Tensor] | None
    beta_logit: Tensor  # [N, H]
    decay_in: Tensor  # the decay's input (what decay_from takes)
    gate_in: Tensor  # the output gate's low-rank input

    def conv_input(self, num_heads: int, head_dim: int) -> Tensor:
        """q | k | v [N, 3W] as the conv reads it: KV heads tiled (as supernet.layers.repeat_heads), LoRA deltas
        added (what the C kernel does). Written into one buffer: at prefill sizes the copies and temporaries of
        tiling, adding and concatenating cost about as much as the projection itself."""
        n, width = self.q.shape[0], num_heads * head_dim
        kv_heads = self.k.shape[-1] // head_dim
        out = self.q.new_empty(n, 3 * width)
        out[:, :width] = self.q
        for i, (t, lora) in enumerate(((self.k, self.k_lora), (self.v, self.v_lora)), start=1):
            part = out[:, i * width : (i + 1) * width]
            tiled = t.reshape(n, kv_heads, 1, head_dim).expand(n, kv_heads, num_heads // kv_heads, head_dim)
            part.view(n, kv_heads, -1, head_dim).copy_(tiled)
            if lora is not None:
                part.addmm_(lora[0], lora[1].t())
        return out


def decode_step(mixer, x: Tensor, base, states: Sequence[DeltaState]) -> Tensor:
    """``mixer.forward`` for x [N, 1, hidden] on the fast path (same math, see the module docstring)."""
    n = x.shape[0]
    h, d = mixer.num_heads, mixer.head_dim
    inputs = decode_projection(mixer, base).inputs(x[:, 0])
    o = kernel_step(mixer, inputs, states)
    if o is not None:
        return mixer.proj.out(o.view(n, 1, h * d), base)
    conv, rec = batched_rows(mixer.__dict__.setdefault("_decode_rows", {}), states, ("conv", "recurrent"))
    y = conv_step_(inputs.conv_input(h, d), conv, mixer.conv_weight, activation="silu").view(n, 3, h, d)
    qk = l2_norm(y[:, :2])  # q and k normalised in one pass
    g, beta = mixer.decay_from(inputs.decay_in), torch.sigmoid(inputs.beta_logit)
    o = delta_rule_step_(qk[:, 0], qk[:, 1], y[:, 2], g, beta, rec)
    gate = mixer.gate.up(inputs.gate_in).view(n, 1, h, d)
    o = gated_rms_norm(o.to(x.dtype).view(n, 1, h, d), gate, mixer.norm_weight, mixer.eps, mixer.gate_activation)
    return mixer.proj.out(o.reshape(n, 1, h * d), base)


@dataclass(frozen=True)
class KernelWeights:
    """The up projections the C kernel applies, transposed to [rank, W] (how it runs them: kernels/cpu/
    delta_decode.c up_project): the output gate's, KDA's decay's (None for GDN), k's and v's LoRA B factors
    (None without LoRA)."""

    gate_up: Tensor
    decay_up: Tensor | None
    lora_b: tuple[Tensor, Tensor] | None


def kernel_weights(mixer, lora_b: tuple[Tensor, Tensor] | None) -> KernelWeights:
    """``mixer``'s KernelWeights, cached on it until a source weight changes (``kernels.linear.derived``)."""
    decay_up = mixer.decay_up()
    sources = [mixer.gate.up.weight, decay_up, *(lora_b or ())]

    def build() -> KernelWeights:
        def t(w: Tensor) -> Tensor:
            return w.detach().t().contiguous()

        return KernelWeights(
            t(mixer.gate.up.weight), None if decay_up is None else t(decay_up),
            None if lora_b is None else (t(lora_b[0]), t(lora_b[1])),
        )

    return derived(mixer, "decode_kernel", sources, build)


def kernel_step(
    mixer, inputs: StepInputs, states: Sequence[DeltaState], weights: KernelWeights | None = None
) -> Tensor | None:
    """The step after the projection on the C kernel (kernels/cpu/delta_decode.c): the output projection's input
    [N, H * D], the rows' states advanced in place; None where the kernel does not serve (no kernels, not fp32,
    a head dim past its limit), and nothing is touched then. ``weights``: ``kernel_weights``' result, if the
    caller holds it."""
    lib = cpu_kernels.library()
    if (lib is None or inputs.q.dtype != torch.float32 or inputs.q.stride(-1) != 1
            or mixer.head_dim > cpu_kernels.MAX_DELTA_HEAD_DIM
            or any(s.conv.dtype != torch.float32 for s in states)):
        return None
    conv, rec = batched_rows(mixer.__dict__.setdefault("_decode_rows", {}), states, ("conv", "recurrent"))
    if weights is None:
        lora_b = None if inputs.k_lora is None or inputs.v_lora is None else (inputs.k_lora[1], inputs.v_lora[1])
        weights = kernel_weights(mixer, lora_b)
    k_lora = v_lora = None
    if inputs.k_lora is not None and inputs.v_lora is not None and weights.lora_b is not None:
        k_lora, v_lora = (inputs.k_lora[0], weights.lora_b[0]), (inputs.v_lora[0], weights.lora_b[1])
    return cpu_kernels.delta_decode(
        lib, inputs.q, inputs.k, inputs.v, k_lora, v_lora, conv, mixer.conv_weight, inputs.decay_in,
        weights.decay_up, mixer.dt_bias, mixer.A_log, inputs.beta_logit,
        (inputs.gate_in, weights.gate_up, mixer.gate.up.bias), mixer.gate_activation, rec, mixer.norm_weight,
        mixer.eps,
    )


@dataclass
class DecodeProjection:
    """Everything a decode step reads from x: one or two prepared products, each with the sizes its output
    splits into (in StepInputs' order), and k's and v's LoRA B factors (their A outputs are among the parts)."""

    products: list[tuple[PreparedLinear, list[int]]]
    lora_b: tuple[Tensor, Tensor] | None

    def inputs(self, x: Tensor) -> StepInputs:
        """The step's inputs from x [N, hidden]."""
        parts = [p for product, sizes in self.products for p in product(x).split(sizes, dim=-1)]
        if self.lora_b is None:
            return StepInputs(parts[0], parts[1], parts[2], None, None, *parts[3:])
        bk, bv = self.lora_b
        return StepInputs(parts[0], parts[1], parts[2], (parts[3], bk), (parts[4], bv), *parts[5:])


def decode_projection(mixer, base) -> DecodeProjection:
    """The prepared weights of everything a decode step reads from x.

    Own projections (``full`` mode): their fused q/k/v, then the small projections (beta, the decay's and the
    gate's down projections) as one more. Teacher projections with LoRA deltas (``lora`` mode): one matrix of
    q with its delta merged in, the teacher's k and v untiled, k's and v's LoRA A factors, and the small
    projections; the tiling and the k/v deltas (B factors) are applied per row after it (StepInputs.conv_input,
    or inside the C kernel). Merging the k/v deltas into tiled weights instead would read ``kv_repeat`` times
    the teacher's k/v bytes, +2 MB per layer for SmolLM2, which at batch 1 costs more than the FA cache a
    linear mixer saves reading at 2k context (docs/benchmarks.md)."""
    proj = mixer.proj
    smalls = [mixer.b_proj, *mixer.decay_downs(), mixer.gate.down]
    small_sizes = [m.out_features for m in smalls]
    if proj.own is not None:
        own = proj.own
        qkv_sizes = [p.out_features for p in (own.q_proj, own.k_proj, own.v_proj)]
        small = prepare_fused(mixer, "decode_x", [m.weight for m in smalls], [m.bias for m in smalls])
        return DecodeProjection([(own.prepared_qkv(), qkv_sizes), (small, small_sizes)], None)
    teacher = (base.q_proj, base.k_proj, base.v_proj)
    loras = [proj.lora[key] for key in "qkv"] if proj.lora is not None else []

    def make() -> tuple[Tensor, Tensor | None]:
        weights = [p.weight for p in teacher]
        if loras:
            weights[0] = weights[0] + loras[0].B @ loras[0].A
            weights += [loras[1].A, loras[2].A]
        weights += [m.weight for m in smalls]
        biases = [p.bias for p in teacher] + [None] * (len(loras) and 2) + [m.bias for m in smalls]
        if all(b is None for b in biases):
            return torch.cat(weights), None
        parts = zip(weights, biases, strict=True)
        return torch.cat(weights), torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])

    sources = [t for p in teacher for t in (p.weight, p.bias)]
    sources += [t for lora in loras for t in (lora.A, lora.B)] + [t for m in smalls for t in (m.weight, m.bias)]
    sizes = [p.out_features for p in teacher] + [lora.A.shape[0] for lora in loras[1:]] + small_sizes
    lora_b = (loras[1].B, loras[2].B) if loras else None
    return DecodeProjection([(prepare(mixer, "decode_x", sources, make), sizes)], lora_b)
