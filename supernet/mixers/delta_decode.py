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


def decode_step(mixer, x: Tensor, base, states: Sequence[DeltaState]) -> Tensor:
    """``mixer.forward`` for x [N, 1, hidden] on the fast path (same math, see the module docstring)."""
    n = x.shape[0]
    h, d = mixer.num_heads, mixer.head_dim
    qkv = torch.cat(mixer.proj.qkv(x, base), dim=-1)[:, 0]
    conv, rec = batched_rows(mixer.__dict__.setdefault("_decode_rows", {}), states, ("conv", "recurrent"))
    y = conv_step_(qkv, conv, mixer.conv_weight, activation="silu")
    q, k, v = y.view(n, 3, h, d).unbind(1)
    q, k = l2_norm(q), l2_norm(k)
    beta = torch.sigmoid(mixer.b_proj(x[:, 0]))
    o = delta_rule_step_(q, k, v, mixer.decay(x)[:, 0], beta, rec)
    gate = mixer.gate(x).view(n, 1, h, d)
    o = gated_rms_norm(o.to(x.dtype).view(n, 1, h, d), gate, mixer.norm_weight, mixer.eps, mixer.gate_activation)
    return mixer.proj.out(o.reshape(n, 1, h * d), base)
