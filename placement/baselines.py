"""Placement search baselines the exact DP and the guided search are compared with: a layer-by-layer beam
(greedy at width 1) on the same surrogate, and random placements; plus the anchor placements every search
measures first."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from placement.constraints import Constraints, InfeasibleError
from placement.surrogate import QualityTables
from supernet.config import MIXER_NAMES


def beam_search(
    tables: QualityTables,
    costs: dict[str, float],
    budget: float,
    constraints: Constraints | None = None,
    width: int = 8,
    kv_bytes: Mapping[str, float] | None = None,
) -> tuple[tuple[str, ...], float] | None:
    """Layer-by-layer beam on the surrogate (width 1 = greedy): keep the ``width`` best partial placements
    that can still finish within budget. The baseline the exact DP is compared with."""
    cons = constraints or Constraints(tables.num_layers)
    L = tables.num_layers
    min_rest = [sum((min(costs[m] for m in cons.per_layer[j]) for j in range(l, L)), 0.0) for l in range(L + 1)]
    beams: list[tuple[tuple[str, ...], float, float]] = [((), tables.const, 0.0)]
    for l in range(L):
        cand = []
        for p, v, c in beams:
            for m in cons.per_layer[l]:
                nc = c + costs[m]
                if nc + min_rest[l + 1] > budget + 1e-12:
                    continue
                q = p + (m,)
                fa_left = cons.min_fa - sum(x == "fa" for x in q)
                if fa_left > sum("fa" in cons.per_layer[j] for j in range(l + 1, L)):
                    continue
                gain = tables.unary[l, tables.mixers.index(m)] + sum(
                    tables.pair[l, k, tables.mixers.index(q[l - k - 1]), tables.mixers.index(m)]
                    for k in range(tables.distance)
                    if l - k - 1 >= 0
                )
                cand.append((q, v + gain, nc))
        cand.sort(key=lambda t: -t[1])
        beams = cand[:width]
        if not beams:
            return None
    feasible = [b for b in beams if cons.admits(b[0], kv_bytes)]
    return (feasible[0][0], feasible[0][1]) if feasible else None


def random_placement(
    rng: np.random.Generator,
    constraints: Constraints,
    kv_bytes: Mapping[str, float] | None = None,
    tries: int = 1000,
) -> tuple[str, ...]:
    """Mixer shares drawn from a flat Dirichlet per placement, then layers i.i.d. from those shares: covers
    mostly-FA to mostly-linear placements, unlike uniform per-layer draws that concentrate at 25% of each."""
    cons = constraints
    for _ in range(tries):
        shares = dict(zip(MIXER_NAMES, rng.dirichlet(np.ones(len(MIXER_NAMES))), strict=True))
        p = []
        for allowed in cons.per_layer:
            w = np.array([shares[m] for m in allowed])
            p.append(allowed[int(rng.choice(len(allowed), p=w / w.sum()))])
        need = cons.min_fa - p.count("fa")
        if need > 0:
            slots = [l for l in range(cons.num_layers) if p[l] != "fa" and "fa" in cons.per_layer[l]]
            for l in rng.choice(slots, size=need, replace=False):
                p[int(l)] = "fa"
        if cons.admits(p, kv_bytes):
            return tuple(p)
    raise InfeasibleError("could not draw a random placement satisfying the constraints (KV budget too tight?)")


def anchor_placements(constraints: Constraints, kv_bytes: Mapping[str, float] | None = None) -> list[tuple[str, ...]]:
    """all-FA plus 'as much of mixer m as the constraints allow' for each other mixer (required FA layers
    spread evenly): the ends of the front are then always measured."""
    cons = constraints
    L = cons.num_layers
    out = [("fa",) * L]
    for m in MIXER_NAMES[1:]:
        p = [m if m in a else a[-1] for a in cons.per_layer]
        fa_slots = [l for l in range(L) if "fa" in cons.per_layer[l] and p[l] != "fa"]
        need = cons.min_fa - p.count("fa")
        if need > 0:
            picks = [fa_slots[round((i + 0.5) * len(fa_slots) / need - 0.5)] for i in range(need)]
            for l in picks:
                p[l] = "fa"
        if cons.admits(p, kv_bytes) and tuple(p) not in out:
            out.append(tuple(p))
    return out
