"""The supernet: a Llama-style decoder whose every layer holds all four mixers over one shared MLP and norms.

``forward`` takes a placement (one mixer per layer) for the whole batch, or one placement per row: rows are then
grouped at each layer by the mixer they use there, and each group runs its mixer. That is how one batch serves
requests on different presets with no weight reload and no cache wipe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from kernels.linear import linear, use_packed
from supernet import decode_program
from supernet.cache import LayerState, SequenceState
from supernet.config import MIXER_NAMES, SupernetConfig
from supernet.layers import MLP, AttentionProjections, Linear, RMSNorm, RotaryEmbedding
from supernet.mixers import Mixer, MixerContext, build_mixer
from supernet.placement import ALIASES, Placement, parse_placement


@dataclass
class SupernetOutput:
    logits: Tensor  # [B, T', vocab] (T' = T, or num_logits_to_keep)
    # per layer (mixer input, mixer output), when asked: what per-layer activation matching trains on
    mixer_io: list[tuple[Tensor, Tensor]] | None = None


def no_reduce(x: Tensor) -> Tensor:
    """``DecoderLayer.reduce`` without tensor parallelism: the layer's outputs are already whole."""
    return x


class DecoderLayer(nn.Module):
    def __init__(self, config: SupernetConfig) -> None:
        super().__init__()
        # Sums the row-parallel partial outputs of the mixer and of the MLP over tensor-parallel ranks (an
        # all-reduce set by supernet.tensor_parallel.shard_layer); the identity on an unsharded layer.
        self.reduce: Callable[[Tensor], Tensor] = no_reduce
        fa = config.fa
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
        # lora mode: the teacher's attention projections, held once and shared by every mixer of the layer.
        self.attn = (
            AttentionProjections(config.hidden_size, fa.num_heads, fa.num_kv_heads, fa.head_dim, fa.bias)
            if config.mixer_weights == "lora"
            else None
        )
        self.mixers = nn.ModuleDict({name: build_mixer(name, config) for name in MIXER_NAMES})

    def mix(
        self, h: Tensor, names: Sequence[str], ctx: MixerContext, states: list[LayerState] | None
    ) -> Tensor:
        """Run each row's mixer on the normed input h; rows sharing a mixer run together."""
        if len(set(names)) == 1:
            return self.mixers[names[0]](h, self.attn, ctx, states)
        out = torch.empty_like(h)
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            index = torch.tensor(rows, device=h.device)
            sub_states = None if states is None else [states[i] for i in rows]
            out[index] = self.mixers[name](h[index], self.attn, ctx.rows(index), sub_states).to(out.dtype)
        return out

    def forward(
        self,
        x: Tensor,
        names: Sequence[str],
        ctx: MixerContext,
        states: list[LayerState] | None,
        mixer_io: list | None = None,
    ) -> Tensor:
        h = self.input_layernorm(x)
        mixed = self.reduce(self.mix(h, names, ctx, states))
        if mixer_io is not None:
            mixer_io.append((h, mixed))
        x = x + mixed
        return x + self.reduce(self.mlp(self.post_attention_layernorm(x)))


class SupernetForCausalLM(nn.Module):
    def __init__(self, config: SupernetConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(
            config.fa.head_dim, config.rope_parameters, config.max_position_embeddings
        )

    def placement(self, spec: str | Sequence[str]) -> Placement:
        return parse_placement(spec, self.config.num_hidden_layers)

    def layer(self, index: int) -> DecoderLayer:
        """Decoder layer ``index``, typed (indexing an ``nn.ModuleList`` gives a plain Module)."""
        return cast(DecoderLayer, self.layers[index])

    def mixer(self, layer: int, name: str) -> Mixer:
        """Layer ``layer``'s mixer ``name``, typed."""
        return cast(Mixer, self.layer(layer).mixers[name])

    def new_state(self, placement: str | Sequence[str]) -> SequenceState:
        """Empty decoding state for one sequence; its layers follow the placement (FA grows, SWA bounded,
        GDN/KDA fixed)."""
        placement = self.placement(placement)
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        return SequenceState(
            placement,
            [
                self.mixer(i, name).new_state(dtype, device) for i, name in enumerate(placement)
            ],
        )

    def forward(
        self,
        input_ids: Tensor,
        placement: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        states: Sequence[SequenceState] | None = None,
        *,
        num_logits_to_keep: int = 0,
        return_mixer_io: bool = False,
    ) -> SupernetOutput:
        """input_ids [B, T]. Without ``states`` every row is a whole sequence from position 0 (training,
        scoring). With ``states`` (one per row) the tokens continue those sequences, whose own placements apply
        and whose caches are updated in place."""
        b, t = input_ids.shape
        rows = self._row_placements(b, placement, states)
        if states is not None and not return_mixer_io and decode_program.serves(self, input_ids, states):
            return SupernetOutput(decode_program.step(self, input_ids, states))
        if states is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        else:
            start = torch.tensor([s.length for s in states], device=input_ids.device)
            positions = start[:, None] + torch.arange(t, device=input_ids.device)
        cos, sin = self.rotary(positions)
        ctx = MixerContext(positions, cos, sin)
        mixer_io: list | None = [] if return_mixer_io else None
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            layer_states = None if states is None else [s.layers[i] for s in states]
            x = layer(x, [p[i] for p in rows], ctx, layer_states, mixer_io)
        if states is not None:
            for s in states:
                s.length += t
        if num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        x = self.norm(x)
        return SupernetOutput(self._logits(x), mixer_io)

    # At most this many rows go through the transposed copy of the output projection (see _logits).
    SMALL_HEAD_ROWS = 2

    def _logits(self, x: Tensor) -> Tensor:
        """The output projection. For a one- or two-token decode step it is a matrix-vector product over the
        largest weight of the model (vocab x hidden), and on CPU ``x @ W.T`` runs it at about half the
        memory bandwidth that ``x @ W_t`` reaches with a contiguous [hidden, vocab] copy (measured here:
        21 ms vs 11 ms for SmolLM2's 113 MB head). The copy is an inference-only cache, rebuilt if the
        weight changes."""
        weight = self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight
        if use_packed(x):  # decode: the head prepacked for oneDNN (kernels/linear.py), faster still
            return linear(x, weight, None, self, "head")
        if torch.is_grad_enabled() or x.shape[0] * x.shape[1] > self.SMALL_HEAD_ROWS:
            return self.lm_head(x) if self.lm_head is not None else x @ weight.T
        try:
            version = weight._version
        except RuntimeError:  # inference tensors carry no version counter
            version = -1
        key = (weight.data_ptr(), weight.dtype, version)
        cached = self.__dict__.get("_head_t")
        if cached is None or cached[0] != key:
            cached = (key, weight.detach().t().contiguous())
            self.__dict__["_head_t"] = cached
        return x @ cached[1]

    def _row_placements(self, batch: int, placement, states) -> list[Placement]:
        if states is not None:
            if placement is not None:
                raise ValueError("pass either states (which carry their placements) or a placement, not both")
            if len(states) != batch:
                raise ValueError(f"{len(states)} states for a batch of {batch}")
            return [s.placement for s in states]
        if placement is None:
            raise ValueError("a placement is required without states")
        if isinstance(placement, str) or all(
            isinstance(p, str) and p.strip().lower() in ALIASES for p in placement
        ):
            return [self.placement(placement)] * batch  # one placement (a spec, or one mixer name per layer)
        if len(placement) != batch:
            raise ValueError(f"{len(placement)} placements for a batch of {batch}")
        return [self.placement(p) for p in placement]

    def trainable_mixer_parameters(self) -> dict[str, nn.Parameter]:
        """The supernet's own weights (everything under ``mixers``): what distillation trains and what a
        delta checkpoint stores. In lora mode this excludes FA, which is the frozen teacher attention."""
        return {n: p for n, p in self.named_parameters() if ".mixers." in n}
