"""Greedy generation with the per-sequence caches: the simplest end-to-end check after a build."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from supernet.model import SupernetForCausalLM


@torch.inference_mode()
def greedy_generate(
    model: SupernetForCausalLM,
    prompt_ids: Sequence[int],
    placement: str | Sequence[str],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
) -> list[int]:
    """Prefill the prompt once, then decode one token per step on the cached state; stops at an EOS id."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    state = model.new_state(placement)
    device = model.embed_tokens.weight.device
    logits = model(
        torch.tensor([list(prompt_ids)], device=device), states=[state], num_logits_to_keep=1
    ).logits
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in eos_token_ids:
            break
        logits = model(torch.tensor([[token]], device=device), states=[state]).logits
    return out
