"""Per-request sampling: temperature, top-k, top-p, seeds, and the log-probabilities clients ask for.

Every sequence carries its own ``SamplingParams`` and its own ``torch.Generator``, so one batch mixes greedy
and sampled rows, and a seeded request draws the same tokens whatever else shares its batch (the draws never
touch a shared RNG).

Log-probabilities are those of the model's own distribution (``log_softmax`` of the raw logits), not of the
temperature/top-p-warped one: that is what log-likelihood evaluation needs and what vLLM reports by default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy (argmax, exactly what supernet.generate.greedy_generate does)
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0 = the chosen token's logprob plus the k most likely
    prompt_logprobs: int | None = None  # echo: logprobs of the prompt tokens themselves (None = off)

    def validate(self) -> None:
        """Raise ValueError naming the bad field (the HTTP layer turns it into a 400)."""
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def make_generator(seed: int | None) -> torch.Generator:
    """A private RNG per sequence: seeded requests are reproducible, unseeded ones independent."""
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else random.getrandbits(63))
    return gen


@dataclass
class TokenLogprobs:
    """Logprob of one chosen token plus the ``k`` most likely alternatives (ids and logprobs, best first)."""

    token_id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


def top_logprobs(logprobs: Tensor, chosen: Tensor, k: int) -> list[TokenLogprobs]:
    """logprobs [N, V] (already log-softmaxed), chosen [N] -> one TokenLogprobs per row."""
    chosen_lp = logprobs.gather(-1, chosen[:, None])[:, 0].tolist()
    if k > 0:
        top = logprobs.topk(k, dim=-1)
        ids, lps = top.indices.tolist(), top.values.tolist()
    else:
        ids = lps = [[] for _ in range(logprobs.shape[0])]
    return [
        TokenLogprobs(int(t), float(lp), i, v)
        for t, lp, i, v in zip(chosen.tolist(), chosen_lp, ids, lps, strict=True)
    ]


def _warp(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p (the order vLLM and HF apply them)."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p (the first token is always kept)
        drop = probs.cumsum(-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def warped_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a sampled row draws from, for logits [V] or [T, V] (speculative decoding compares the
    draft's and the target's under the same warping)."""
    if logits.dim() == 1:
        return _warp(logits, params).softmax(-1)
    return torch.stack([_warp(row, params).softmax(-1) for row in logits])


def draw(probs: Tensor, generator: torch.Generator) -> int:
    """One token from ``probs [V]`` (non-negative weights, any sum) by inverse CDF: one uniform, one search.

    ``torch.multinomial`` takes ~0.85 ms per row for a 49k vocabulary on this CPU (it draws through a slow
    path), ~10% of a batch-8 decode step; this is ~0.04 ms. The CDF accumulates in fp64, so each token keeps its
    probability to ~1e-16 and a zero-probability token is never drawn. Generators live on the CPU
    (make_generator) on every device, so a seeded request draws the same tokens on a GPU as here: the row's
    probabilities go to the generator, not the other way round."""
    cdf = probs.to(device=generator.device, dtype=torch.float64).cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))
    if index < cdf.shape[0]:
        return index
    return int(torch.nonzero(probs).max())  # u rounded up to the total (p ~ 2**-53): the last possible token


def sample(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """One next token per row of ``logits [B, V]``; logprobs for the rows that asked for them."""
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        if not p.greedy:
            probs = warped_probs(logits[i], p)
            tokens[i] = draw(probs, generators[i])
    out_lp: list[TokenLogprobs | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        index = torch.tensor(want)
        lps = torch.log_softmax(logits[index].float(), dim=-1)
        k = max(params[i].logprobs or 0 for i in want)
        for i, entry in zip(want, top_logprobs(lps, tokens[index], k), strict=True):
            kk = params[i].logprobs
            entry.top_ids, entry.top_logprobs = entry.top_ids[:kk], entry.top_logprobs[:kk]
            out_lp[i] = entry
    return tokens.tolist(), out_lp
