"""Test helpers for the core: perturbing a transfer-init supernet so every mixer's own weights matter."""

from __future__ import annotations

import copy

import torch

from supernet.model import SupernetForCausalLM


def perturbed(model: SupernetForCausalLM, seed: int = 0, scale: float = 0.05) -> SupernetForCausalLM:
    """A copy whose supernet-own weights are moved off their init (LoRA B, gates, conv taps, decays), so tests
    exercise the whole mixer path rather than an identity-like starting point."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_mixer_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()
