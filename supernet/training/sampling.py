"""Which mixer each layer uses at a training step.

Every draw comes from a generator seeded by ``(seed, step)``, never from a global RNG: the placements of step
s are the same whatever the number of data-parallel ranks (each rank takes its rows of the global batch) and
whether the run was resumed, which is what makes multi-process and resumed runs reproduce a single
uninterrupted run."""

from __future__ import annotations

import random

from supernet.placement import Placement, parse_placement
from supernet.training.config import SamplingConfig


class PlacementSampler:
    def __init__(self, cfg: SamplingConfig, num_layers: int, seed: int) -> None:
        self.cfg, self.num_layers, self.seed = cfg, num_layers, seed
        self.mixers = list(dict.fromkeys(cfg.mixers))
        if not self.mixers:
            raise ValueError("sampling.mixers is empty")
        self.weights = [float(cfg.weights.get(m, 0.0)) for m in self.mixers]
        if cfg.strategy == "weighted" and (sum(self.weights) <= 0 or min(self.weights) < 0):
            raise ValueError(f"sampling.weights {cfg.weights}: need non-negative weights with a positive sum")
        self.presets = [(parse_placement(p.placement, num_layers), p.prob) for p in cfg.presets]

    def rng(self, step: int) -> random.Random:
        return random.Random(f"placement:{self.seed}:{step}")

    def sample(self, rng: random.Random) -> Placement:
        u = rng.random()
        for placement, prob in self.presets:
            if u < prob:
                return placement
            u -= prob
        n = self.num_layers
        if u < self.cfg.fa_mix_prob:
            return self.fa_mix(rng)
        if self.cfg.strategy == "uniform":
            return tuple(rng.choice(self.mixers) for _ in range(n))
        if self.cfg.strategy == "weighted":
            return tuple(rng.choices(self.mixers, weights=self.weights, k=n))
        # layout: a uniformly random count vector (stars and bars), then a uniformly random arrangement.
        bars = sorted(rng.sample(range(n + len(self.mixers) - 1), len(self.mixers) - 1))
        edges = [-1, *bars, n + len(self.mixers) - 1]
        counts = [edges[i + 1] - edges[i] - 1 for i in range(len(self.mixers))]
        names = [m for m, c in zip(self.mixers, counts, strict=True) for _ in range(c)]
        rng.shuffle(names)
        return tuple(names)

    def fa_mix(self, rng: random.Random) -> Placement:
        n = self.num_layers
        lo, hi = self.cfg.fa_mix_range
        fa = set(rng.sample(range(n), min(n, rng.randint(lo, hi))))
        others: list[str] = [m for m in self.mixers if m != "fa"] or ["fa"]
        return tuple("fa" if i in fa else rng.choice(others) for i in range(n))

    def for_step(self, step: int, batch: int) -> list[Placement]:
        """Placements for the ``batch`` rows of global step ``step`` (one shared placement unless per_row)."""
        rng = self.rng(step)
        if not self.cfg.per_row:
            return [self.sample(rng)] * batch
        return [self.sample(rng) for _ in range(batch)]
