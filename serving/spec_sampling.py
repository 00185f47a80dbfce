"""Drafting and verifying tokens so that speculation never changes what a request can produce.

* Greedy rows: a draft token is accepted while it equals the target's argmax at its position; the first
  mismatch is replaced by the target's argmax, so the output is exactly greedy decoding of the target.
* Sampled rows: standard speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023). Draft token
  ``d ~ q`` is accepted with probability ``min(1, p(d) / q(d))``; on rejection the token is drawn from
  ``norm(max(0, p - q))``; when every draft is accepted a bonus token is drawn from the target's next
  distribution. Each emitted token then follows ``p`` exactly. ``p`` and ``q`` are the *warped* distributions
  (temperature, top-k, top-p: ``sampling.warped_probs``), so the output follows the distribution the request
  asked for, the same one non-speculative sampling draws from.

Every draw uses the sequence's own generator in a fixed order (drafts, then acceptance uniforms, then the
residual or bonus draw), so a seeded request is reproducible; it does not reproduce the tokens of the same seed
without speculation (the draws differ), only their distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from serving.sampling import SamplingParams, draw, warped_probs


def draft_token(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> tuple[int, Tensor | None]:
    """One draft token from the draft's logits [V]; the draft distribution ``q`` when sampling (None if greedy)."""
    if params.greedy:
        return int(logits.argmax()), None
    q = warped_probs(logits, params)
    return draw(q, generator), q


@dataclass
class Verdict:
    tokens: list[int]  # to emit: the accepted drafts, then one token from the target
    accepted: int  # how many drafts were accepted


def verify(
    target_logits: Tensor,
    drafts: list[int],
    draft_probs: list[Tensor | None],
    params: SamplingParams,
    generator: torch.Generator,
) -> Verdict:
    """``target_logits [k + 1, V]``: the target's logits after the pending token and after each of the ``k``
    drafts. Returns what to emit (between 1 and k + 1 tokens)."""
    k = len(drafts)
    if params.greedy:
        best = target_logits.argmax(-1).tolist()
        j = 0
        while j < k and drafts[j] == best[j]:
            j += 1
        return Verdict(drafts[:j] + [best[j]], j)
    p = warped_probs(target_logits, params)
    for j, (d, q) in enumerate(zip(drafts, draft_probs, strict=True)):
        assert q is not None, "a sampled draft carries its distribution"
        u = float(torch.rand((), generator=generator))
        if u * float(q[d]) < float(p[j, d]):  # accept with probability min(1, p(d) / q(d))
            continue
        residual = (p[j] - q).clamp_min(0)
        total = float(residual.sum())
        # p == q up to rounding leaves no residual mass; then a rejection has probability ~0 and p is the answer
        residual = residual / total if total > 0 else p[j]
        return Verdict(drafts[:j] + [draw(residual, generator)], j)
    return Verdict(drafts + [draw(p[k], generator)], k)
