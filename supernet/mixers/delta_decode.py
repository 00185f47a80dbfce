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

import torch
from torch import Tensor

from kernels import gated_rms_norm, l2_norm
from kernels.delta_rule.decode import conv_step_, delta_rule_step_
from kernels.linear import fused_linear
from supernet.cache import DeltaState, batched_rows
from supernet.fastpath import fast_path_enabled
from supernet.layers import repeat_heads


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


def decode_step(mixer, x: Tensor, base, states: Sequence[DeltaState]) -> Tensor:
    """``mixer.forward`` for x [N, 1, hidden] on the fast path (same math, see the module docstring)."""
    n = x.shape[0]
    h, d = mixer.num_heads, mixer.head_dim
    x2 = x[:, 0]
    qkv, beta_logit, decay_in, gate_in = _project(mixer, x2, base)
    conv, rec = batched_rows(mixer.__dict__.setdefault("_decode_rows", {}), states, ("conv", "recurrent"))
    y = conv_step_(qkv, conv, mixer.conv_weight, activation="silu").view(n, 3, h, d)
    qk = l2_norm(y[:, :2])  # q and k normalised in one pass
    o = delta_rule_step_(qk[:, 0], qk[:, 1], y[:, 2], mixer.decay_from(decay_in), torch.sigmoid(beta_logit), rec)
    gate = mixer.gate.up(gate_in).view(n, 1, h, d)
    o = gated_rms_norm(o.to(x.dtype).view(n, 1, h, d), gate, mixer.norm_weight, mixer.eps, mixer.gate_activation)
    return mixer.proj.out(o.reshape(n, 1, h * d), base)


def _project(mixer, x: Tensor, base) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Everything the step reads from x [N, hidden]: the conv input q|k|v [N, 3W], beta's logits, the decay's
    and the output gate's low-rank inputs. The small projections of x (LoRA A factors, beta, the decay's and
    the gate's down projections) run as one matrix, and the three LoRA B factors as one block-diagonal one,
    instead of ~10 separate calls per layer."""
    proj = mixer.proj
    lora = proj.lora
    smalls = [mixer.b_proj, *mixer.decay_downs(), mixer.gate.down]
    weights = [lora[key].A for key in "qkv"] if lora is not None else []
    weights += [m.weight for m in smalls]
    biases = [None] * (len(weights) - len(smalls)) + [m.bias for m in smalls]
    parts = fused_linear(x, mixer, "decode_x", weights, biases).split([w.shape[0] for w in weights], dim=-1)
    if proj.own is not None:
        qkv = torch.cat(proj.own.qkv(x), dim=-1)
    else:
        q, k, v = base.qkv(x)
        qkv = torch.cat((q, repeat_heads(k, proj.head_dim, proj.kv_repeat),
                         repeat_heads(v, proj.head_dim, proj.kv_repeat)), dim=-1)
    if lora is not None:
        qkv = qkv + proj.lora_qkv_b(torch.cat(parts[:3], dim=-1))
        parts = parts[3:]
    return qkv, parts[0], parts[1], parts[2]
