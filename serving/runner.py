"""The model side of the engine: forward passes over per-sequence states, nothing about requests.

Keeping this separate from the scheduler is what makes the next steps additions:
* self-speculative decoding (spec_decode.py) calls ``forward`` with ``k + 1`` tokens per row on the target
  preset's states to verify a draft in one pass (spec_rollback.py takes rejected tokens back);
* another backend (vLLM) replaces the whole engine behind ``types.EngineClient`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from supernet.cache import KVCache, SequenceState
from supernet.model import SupernetForCausalLM
from supernet.placement import Placement


class ModelRunner:
    def __init__(self, model: SupernetForCausalLM) -> None:
        self.model = model.eval()
        self.device = model.embed_tokens.weight.device

    def new_state(self, placement: Placement, capacity: int = 0) -> SequenceState:
        """A fresh state whose FA caches have room for exactly ``capacity`` positions: the scheduler gives a
        sequence cache blocks as it grows and grows these tensors with them (serving.scheduler), so what they
        allocate is what the block pool counts. Appends beyond it still work (the cache doubles)."""
        state = self.model.new_state(placement)
        for layer in state.layers:
            if isinstance(layer, KVCache):
                shape = (layer.k.shape[0], capacity, layer.k.shape[2])
                layer.k, layer.v = layer.k.new_empty(shape), layer.v.new_empty(shape)
        return state

    @torch.inference_mode()
    def forward(
        self, tokens: Sequence[Sequence[int]], states: Sequence[SequenceState], last_only: bool = True
    ) -> Tensor:
        """Continue each row's sequence by its tokens (rows of equal length); fp32 logits [B, T or 1, V]."""
        ids = torch.tensor([list(t) for t in tokens], dtype=torch.long, device=self.device)
        out = self.model(ids, states=list(states), num_logits_to_keep=1 if last_only else 0)
        return out.logits.float()

    def prefill(self, state: SequenceState, tokens: Sequence[int], all_logits: bool = False) -> Tensor:
        """One prompt chunk of one sequence; logits [T, V] (all_logits) or [1, V]."""
        return self.forward([tokens], [state], last_only=not all_logits)[0]

    def decode(self, states: Sequence[SequenceState], tokens: Sequence[int]) -> Tensor:
        """One token for each of many sequences, whatever their placements; logits [B, V]."""
        return self.forward([[t] for t in tokens], states)[:, -1]
