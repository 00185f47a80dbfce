"""Exact Pareto search over placements, its baselines, and the sample -> eval -> fit -> optimise loop.

The optimiser (``dp_front``) is exact dynamic programming over layers. Quality is the surrogate's tables
(per-layer terms + pairwise terms up to distance d), so the DP state after layer l is the mixers of the last d
layers (M^d states), and cost is additive per layer, so the DP also carries the cost spent so far on an
integer grid. Storing, for every exact cost, the best quality reachable gives the optimum for *every* budget
from one pass: the Pareto front is the running maximum over cost. Constraints ride along as extra state:

* minimum number of FA layers: a counter capped at the minimum;
* allowed mixers per layer: masked transitions;
* KV/state memory per sequence at a context: a second additive resource on its own integer grid (per-layer
  bytes rounded *up*, so an accepted placement never exceeds the budget).

Exactness is with respect to the integer costs: real costs (seconds) are put on a grid of ``steps_per_fa``
units per FA layer (default 200, i.e. rounding error < 0.25% of one FA layer per layer); integer costs pass
unchanged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from placement.constraints import Constraints, InfeasibleError
from placement.surrogate import QualityTables

NEG = -np.inf


@dataclass
class FrontPoint:
    placement: tuple[str, ...]
    value: float  # predicted quality
    cost: float  # in the caller's units (grid cost converted back when costs were real)
    grid_cost: int


def integer_costs(costs: dict[str, float], steps_per_fa: int | None) -> dict[str, int]:
    """Per-mixer costs on an integer grid; ``steps_per_fa=None`` means the costs already are integers."""
    if steps_per_fa is None:
        if any(float(c) != int(c) or c < 0 for c in costs.values()):
            raise ValueError(f"integer costs expected, got {costs}")
        return {m: int(c) for m, c in costs.items()}
    unit = costs["fa"] / steps_per_fa
    return {m: max(0, round(c / unit)) for m, c in costs.items()}


def dp_front(
    tables: QualityTables,
    costs: dict[str, float],
    constraints: Constraints | None = None,
    *,
    kv_bytes: Mapping[str, float] | None = None,
    steps_per_fa: int | None = 200,
    kv_steps: int = 64,
) -> list[FrontPoint]:
    """Every Pareto-optimal placement (max predicted quality for each cost budget), cheapest first."""
    mixers = tables.mixers
    nm, L, d = len(mixers), tables.num_layers, tables.distance
    cons = constraints or Constraints(L)
    if cons.num_layers != L:
        raise ValueError(f"constraints for {cons.num_layers} layers, tables for {L}")
    ic = integer_costs({m: costs[m] for m in mixers}, steps_per_fa)
    unit = (costs["fa"] / steps_per_fa) if steps_per_fa is not None else 1.0
    R = L * max(ic.values()) + 1
    F = cons.min_fa + 1
    if cons.kv_budget is not None:
        if kv_bytes is None:
            raise ValueError("a KV budget needs per-mixer KV bytes")
        kv_unit = cons.kv_budget / kv_steps if cons.kv_budget > 0 else 1.0
        ik = {m: math.ceil(kv_bytes[m] / kv_unit - 1e-9) for m in mixers}
        K = kv_steps + 1
    else:
        ik, K = {m: 0 for m in mixers}, 1
    S = nm**d
    fa = mixers.index("fa")
    V = np.full((S, R, F, K), NEG)
    V[0, 0, 0, 0] = tables.const
    # Back-pointers, one byte each: the oldest mixer of the previous state (the rest of it is implied by the
    # new state) -- or, with d = 0, the chosen mixer itself -- and the previous FA counter.
    back_choice = np.zeros((L, S, R, F, K), dtype=np.int8)
    back_fa = np.zeros((L, S, R, F, K), dtype=np.int8 if F < 128 else np.int16)
    digits = [[(s // nm**j) % nm for j in range(d)] for s in range(S)]
    for l in range(L):
        new = np.full_like(V, NEG)
        allowed = [mixers.index(m) for m in cons.per_layer[l]]
        live = [s for s in range(S) if np.isfinite(V[s]).any()]
        for s in live:
            for m in allowed:
                gain = tables.unary[l, m] + sum(tables.pair[l, k, digits[s][k], m] for k in range(d) if l - k - 1 >= 0)
                ns = (s * nm) % S + m if d else 0
                choice = digits[s][d - 1] if d else m
                c, kv = ic[mixers[m]], ik[mixers[m]]
                if c >= R or kv >= K:
                    continue
                for f in range(F):
                    nf = min(f + (m == fa), F - 1)
                    src = V[s, : R - c, f, : K - kv] + gain
                    dst = new[ns, c:, nf, kv:]
                    better = src > dst
                    if better.any():
                        dst[better] = src[better]
                        back_choice[l, ns, c:, nf, kv:][better] = choice
                        back_fa[l, ns, c:, nf, kv:][better] = f
        V = new
    final = V[:, :, F - 1, :]  # [S, R, K]
    best = final.max(axis=(0, 2))
    if not np.isfinite(best).any():
        raise InfeasibleError("no placement satisfies the constraints (allowed mixers, min FA layers, KV budget)")
    points: list[FrontPoint] = []
    running = NEG
    for r in range(R):
        if best[r] > running + 1e-12:
            running = best[r]
            end_state, end_kv = np.unravel_index(int(np.argmax(final[:, r, :])), (S, K))
            placement = _backtrack(back_choice, back_fa, mixers, int(end_state), r, F - 1, int(end_kv), ic, ik, d)
            points.append(FrontPoint(placement, float(best[r]), r * unit, r))
    return points


def _backtrack(back_choice, back_fa, mixers, s, r, f, k, ic, ik, d) -> tuple[str, ...]:
    nm = len(mixers)
    out: list[str] = []
    for l in range(back_choice.shape[0] - 1, -1, -1):
        choice, prev_f = int(back_choice[l, s, r, f, k]), int(back_fa[l, s, r, f, k])
        m = mixers[s % nm] if d else mixers[choice]
        out.append(m)
        r, k, f = r - ic[m], k - ik[m], prev_f
        s = choice * nm ** (d - 1) + s // nm if d else 0
    return tuple(reversed(out))


def best_under_budget(front: Sequence[FrontPoint], budget: float) -> FrontPoint:
    """The front's best point costing at most ``budget``; InfeasibleError (naming the cheapest) if none
    does."""
    fits = [p for p in front if p.cost <= budget + 1e-12]
    if not fits:
        raise InfeasibleError(
            f"budget {budget:.6g} is infeasible: the cheapest placement allowed by the "
            f"constraints costs {front[0].cost:.6g}"
        )
    return max(fits, key=lambda p: p.value)


def brute_force_front(
    tables: QualityTables,
    costs: dict[str, int],
    constraints: Constraints | None = None,
    kv_bytes: Mapping[str, float] | None = None,
) -> dict[int, float]:
    """Best value at each exact integer cost over every admissible placement (test oracle, <= ~8 layers)."""
    cons = constraints or Constraints(tables.num_layers)
    best: dict[int, float] = {}
    for p in itertools.product(*cons.per_layer):
        if not cons.admits(p, kv_bytes):
            continue
        c = sum(costs[m] for m in p)
        v = tables.value(p)
        if v > best.get(c, NEG):
            best[c] = v
    return best
