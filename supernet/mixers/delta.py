"""Linear-time mixers: Gated DeltaNet (one log-decay per head) and Kimi Delta Attention (one per key channel).

Both follow the same path (REFERENCE.md, "Mixer math"):
  q, k, v = SiLU(short causal conv(projections)); q, k L2-normalised per head; beta = sigmoid(W_b x);
  delta-rule recurrence on an fp32 state; gated RMSNorm of the output; output projection.
They differ in the decay (GDN scalar, KDA per channel through a low-rank projection) and the output gate
(GDN SiLU, KDA sigmoid). The recurrence itself lives in kernels/.

Transfer init (so every placement starts near the teacher): q/k/v/o are the teacher's (KV heads tiled), the
convolution is the identity (only the newest tap is 1), beta starts at 0.5, the output gate starts neutral (its
low-rank weight is zero and its bias makes the gate ~1), and the decay starts fast (half-life ~10 tokens), which
REFERENCE.md measured to transfer better than a slow multi-scale decay.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import (
    causal_conv1d,
    causal_conv1d_update,
    chunk_gated_delta_rule,
    chunk_kda,
    gated_rms_norm,
    l2_norm,
    recurrent_gated_delta_rule,
    recurrent_kda,
)
from kernels.linear import use_packed
from supernet.cache import DeltaState, LayerState
from supernet.config import DeltaConfig, SupernetConfig
from supernet.layers import AttentionProjections, Linear
from supernet.mixers.base import Mixer, MixerContext, MixerProjections
from supernet.mixers.delta_decode import decode_projection, decode_step, use_fast_decode

SILU_ONE = 1.2784645  # silu(SILU_ONE) == 1.0: the GDN output gate's neutral bias
SIGMOID_NEUTRAL = 5.0  # sigmoid(5) ~= 0.993: KDA's near-open gate
FAST_DECAY = (
    0.1  # exp(A_log) at init; with softplus(0) the per-token decay is exp(-0.069) (half-life ~10 tokens)
)


class LowRank(nn.Module):
    """hidden -> rank -> out, the second projection zero-initialised so the output starts at its bias."""

    def __init__(self, hidden: int, rank: int, out: int, bias_init: float | None) -> None:
        super().__init__()
        self.down = Linear(hidden, rank, bias=False)
        self.up = Linear(rank, out, bias=bias_init is not None)
        nn.init.zeros_(self.up.weight)
        if bias_init is not None:
            nn.init.constant_(self.up.bias, bias_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class DeltaMixer(Mixer):
    """GDN and KDA: everything but the decay (``build_decay``, ``decay_downs``, ``decay_from``), the kernels
    (``rule``) and the output gate's activation and neutral bias."""

    gate_activation: str
    gate_bias: float  # the output gate's initial bias: ~1 after ``gate_activation``
    # Tokens per chunk of the chunked rule in CPU inference (prefill, scoring). Any size gives the same result;
    # on one CPU thread 16 measured fastest for both mixers here (a 256-token prefill chunk of the demo: GDN's
    # rule 2.4 ms at 16 vs 3.0 at 32 and 4.7 at 64, KDA's 3.9 vs 5.4 and 6.2; whole-model prefill no slower at
    # 4k). Training keeps the kernels' default (64, fla's).
    cpu_inference_chunk = 16

    def __init__(
        self, name: str, config: SupernetConfig, dcfg: DeltaConfig, *, own: bool, lora_rank: int
    ) -> None:
        super().__init__(name)
        fa = config.fa
        if dcfg.num_heads != fa.num_heads or dcfg.head_dim != fa.head_dim:
            raise ValueError(
                f"config.{name}: heads x head_dim must match the attention's "
                f"({fa.num_heads} x {fa.head_dim}) for transfer from the teacher"
            )
        self.num_heads, self.head_dim, self.eps = dcfg.num_heads, dcfg.head_dim, dcfg.norm_eps
        width = dcfg.num_heads * dcfg.head_dim
        self.proj = MixerProjections.of(
            config.hidden_size, fa, own=own, lora_rank=lora_rank, kv_repeat=fa.num_heads // fa.num_kv_heads
        )
        self.conv_weight = nn.Parameter(torch.zeros(3 * width, dcfg.conv_kernel))
        with torch.no_grad():
            self.conv_weight[:, -1] = 1.0
        self.b_proj = Linear(config.hidden_size, dcfg.num_heads, bias=True)
        nn.init.zeros_(self.b_proj.weight)
        nn.init.zeros_(self.b_proj.bias)
        self.A_log = nn.Parameter(torch.full((dcfg.num_heads,), math.log(FAST_DECAY)))
        self.norm_weight = nn.Parameter(torch.ones(dcfg.head_dim))
        self.build_decay(config.hidden_size, dcfg)
        self.gate = LowRank(config.hidden_size, dcfg.gate_rank, width, self.gate_bias)

    def build_decay(self, hidden: int, dcfg: DeltaConfig) -> None:
        """The decay's own parameters (built before the output gate, so parameter order and init draws are
        the same in every checkpoint)."""
        raise NotImplementedError

    def decay(self, x: Tensor) -> Tensor:
        """Log-decay g <= 0: [B, T, H] for GDN, [B, T, H, K] for KDA; ``decay_from`` of the ``decay_downs``."""
        (down,) = self.decay_downs()
        return self.decay_from(down(x))

    def decay_downs(self) -> list[nn.Linear]:
        """The projections of x that ``decay_from`` starts from (fused with others on the decode path)."""
        raise NotImplementedError

    def decay_up(self) -> Tensor | None:
        """The weight that maps ``decay_from``'s input to one logit per key channel (KDA), or None where that
        input already is one logit per head (GDN): what the C decode kernel needs to do ``decay_from`` itself
        (kernels/cpu/delta_decode.c)."""
        raise NotImplementedError

    def decay_from(self, down: Tensor) -> Tensor:
        raise NotImplementedError

    def rule(self, chunked: bool):
        raise NotImplementedError

    def forward(
        self, x: Tensor, base: AttentionProjections | None, ctx: MixerContext, states: list[LayerState] | None
    ) -> Tensor:
        rows = cast("list[DeltaState] | None", states)  # new_state gives a delta mixer DeltaStates
        if rows is not None and use_fast_decode(x, rows):
            return decode_step(self, x, base, rows)
        b, t, _ = x.shape
        if use_packed(x):  # inference: everything read from x in one prepared product, as the decode step does
            inputs = decode_projection(self, base).inputs(x.reshape(b * t, -1))
            qkv = raw = inputs.conv_input(self.num_heads, self.head_dim).view(b, t, -1)
            beta = torch.sigmoid(inputs.beta_logit).view(b, t, -1)
            g = self.decay_from(inputs.decay_in.view(b, t, -1))
            gate = self.gate.up(inputs.gate_in).view(b, t, self.num_heads, self.head_dim)
        else:
            qkv = raw = torch.cat(self.proj.qkv(x, base), dim=-1)
            beta, g = torch.sigmoid(self.b_proj(x)), self.decay(x)
            gate = self.gate(x).view(b, t, self.num_heads, self.head_dim)
        conv_state = None if rows is None else torch.stack([s.conv for s in rows])
        rec_state = None if rows is None else torch.stack([s.recurrent for s in rows])
        if conv_state is not None and t == 1:
            qkv, conv_state = causal_conv1d_update(qkv, conv_state, self.conv_weight, activation="silu")
        else:
            qkv, conv_state = causal_conv1d(
                qkv,
                self.conv_weight,
                activation="silu",
                initial_state=conv_state,
                output_final_state=rows is not None,
            )
        q, k, v = (z.view(b, t, self.num_heads, self.head_dim) for z in qkv.chunk(3, dim=-1))
        q, k = l2_norm(q), l2_norm(k)
        if rows is not None and any(s.history is not None for s in rows):
            o, rec_state = self._recorded(raw, q, k, v, g, beta, rec_state, rows)
        else:
            chunked = rows is None or t > 1
            options = {}
            if chunked and x.device.type == "cpu" and not torch.is_grad_enabled():
                options["chunk_size"] = self.cpu_inference_chunk
            rule = self.rule(chunked)
            o, rec_state = rule(
                q, k, v, g, beta, initial_state=rec_state, output_final_state=rows is not None, **options
            )
        if rows is not None:  # then both final states were asked for, so neither is None
            conv_final, rec_final = cast(Tensor, conv_state), cast(Tensor, rec_state)
            for i, state in enumerate(rows):
                state.conv, state.recurrent = conv_final[i], rec_final[i]
        o = gated_rms_norm(o, gate, self.norm_weight, self.eps, activation=self.gate_activation)
        return self.proj.out(o.reshape(b, t, -1), base)

    def _recorded(self, raw, q, k, v, g, beta, rec_state, states) -> tuple[Tensor, Tensor]:
        """Speculative window (a state with an open DeltaState.history): run the decode recurrence one token at
        a time -- the exact arithmetic of T == 1 decode steps -- and record every position's state, so a
        rejected draft rolls back to the last accepted position without recomputing anything."""
        rule, outs, steps = self.rule(chunked=False), [], []
        for i in range(q.shape[1]):
            at = slice(i, i + 1)
            o, rec_state = rule(
                q[:, at], k[:, at], v[:, at], g[:, at], beta[:, at], initial_state=rec_state, output_final_state=True
            )
            outs.append(o)
            steps.append(rec_state)
        for r, state in enumerate(states):
            if state.history is not None:
                state.record(raw[r], [s[r] for s in steps])
        return torch.cat(outs, dim=1), rec_state

    def new_state(self, dtype: torch.dtype, device: torch.device) -> LayerState:
        width = self.num_heads * self.head_dim
        return DeltaState(
            torch.zeros(3 * width, self.conv_weight.shape[1] - 1, dtype=dtype, device=device),
            torch.zeros(self.num_heads, self.head_dim, self.head_dim, dtype=torch.float32, device=device),
        )


class GatedDeltaNet(DeltaMixer):
    gate_activation, gate_bias = "silu", SILU_ONE

    def build_decay(self, hidden: int, dcfg: DeltaConfig) -> None:
        self.a_proj = Linear(hidden, dcfg.num_heads, bias=False)
        nn.init.zeros_(self.a_proj.weight)
        self.dt_bias = nn.Parameter(torch.zeros(dcfg.num_heads))

    def decay_downs(self) -> list[nn.Linear]:
        return [self.a_proj]

    def decay_up(self) -> Tensor | None:
        return None

    def decay_from(self, a: Tensor) -> Tensor:
        return -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)

    def rule(self, chunked: bool):
        return chunk_gated_delta_rule if chunked else recurrent_gated_delta_rule


class KimiDeltaAttention(DeltaMixer):
    gate_activation, gate_bias = "sigmoid", SIGMOID_NEUTRAL

    def build_decay(self, hidden: int, dcfg: DeltaConfig) -> None:
        width = dcfg.num_heads * dcfg.head_dim
        self.f_proj = LowRank(hidden, dcfg.gate_rank, width, None)
        self.dt_bias = nn.Parameter(torch.zeros(width))

    def decay_downs(self) -> list[nn.Linear]:
        return [self.f_proj.down]

    def decay_up(self) -> Tensor | None:
        return self.f_proj.up.weight  # built without a bias (LowRank(..., None))

    def decay_from(self, down: Tensor) -> Tensor:
        f = (self.f_proj.up(down).float() + self.dt_bias).unflatten(-1, (self.num_heads, self.head_dim))
        return -self.A_log.float().exp()[:, None] * F.softplus(f)

    def rule(self, chunked: bool):
        return chunk_kda if chunked else recurrent_kda
