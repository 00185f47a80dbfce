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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from placement.surrogate import QualityTables, Surrogate, cross_validate, held_out_scores
from supernet.config import MIXER_NAMES
from supernet.placement import PlacementError, canonical_mixer, format_placement

NEG = -np.inf


class InfeasibleError(ValueError):
    """No placement satisfies the constraints (or the budget)."""


@dataclass
class Constraints:
    num_layers: int
    allowed: list[tuple[str, ...]] | None = None  # per layer; None = every mixer everywhere
    min_fa: int = 0
    kv_budget: float | None = None  # bytes per sequence (at the cost model's context)

    def __post_init__(self) -> None:
        if self.allowed is None:
            self.allowed = [MIXER_NAMES] * self.num_layers
        if len(self.allowed) != self.num_layers:
            raise PlacementError(
                f"allowed mixers given for {len(self.allowed)} layer(s) but the model has {self.num_layers}"
            )
        if not 0 <= self.min_fa <= self.num_layers:
            raise InfeasibleError(
                f"--min-fa {self.min_fa}: must be between 0 and the number of layers ({self.num_layers})"
            )
        fa_slots = sum("fa" in a for a in self.allowed)
        if fa_slots < self.min_fa:
            raise InfeasibleError(f"--min-fa {self.min_fa} is infeasible: FA is allowed on only {fa_slots} layer(s)")

    def admits(self, placement: Sequence[str], kv_bytes: dict[str, float] | None = None) -> bool:
        if any(m not in a for m, a in zip(placement, self.allowed, strict=True)):
            return False
        if sum(m == "fa" for m in placement) < self.min_fa:
            return False
        if self.kv_budget is not None and kv_bytes is not None:
            return sum(kv_bytes[m] for m in placement) <= self.kv_budget
        return True


def parse_allowed(spec: str | None, num_layers: int) -> list[tuple[str, ...]] | None:
    """Per-layer allowed mixers: a comma list (one item per layer, ``*N`` repeats) of ``a|b`` alternatives or
    ``any``; or ``all-a|b`` for every layer. E.g. ``fa,any*28,fa`` or ``all-fa|swa|gdn``."""
    if spec is None or not spec.strip():
        return None

    def one(item: str) -> tuple[str, ...]:
        item = item.strip().lower()
        if item in ("any", "*", ""):
            return MIXER_NAMES
        names = tuple(dict.fromkeys(canonical_mixer(x) for x in item.split("|")))
        return tuple(m for m in MIXER_NAMES if m in names)

    text = spec.strip()
    if text.lower().startswith("all-"):
        return [one(text[4:])] * num_layers
    out: list[tuple[str, ...]] = []
    for item in text.split(","):
        name, _, count = item.partition("*")
        if count and not count.strip().isdigit():
            raise PlacementError(f"bad repeat count in {item.strip()!r}; expected e.g. 'any*28'")
        out.extend([one(name)] * (int(count) if count else 1))
    if len(out) != num_layers:
        raise PlacementError(
            f"--allowed lists {len(out)} layer(s) but the model has {num_layers}; "
            f"use one item per layer (with *N repeats) or 'all-fa|swa|gdn'"
        )
    return out


# ----------------------------------------------------------------------------------------------- exact DP


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
    kv_bytes: dict[str, float] | None = None,
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
        allowed = [mixers.index(m) for m in cons.allowed[l]]
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
            s, k = np.unravel_index(int(np.argmax(final[:, r, :])), (S, K))
            placement = _backtrack(back_choice, back_fa, mixers, int(s), r, F - 1, int(k), ic, ik, d)
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
    kv_bytes: dict[str, float] | None = None,
) -> dict[int, float]:
    """Best value at each exact integer cost over every admissible placement (test oracle, <= ~8 layers)."""
    cons = constraints or Constraints(tables.num_layers)
    best: dict[int, float] = {}
    for p in itertools.product(*cons.allowed):
        if not cons.admits(p, kv_bytes):
            continue
        c = sum(costs[m] for m in p)
        v = tables.value(p)
        if v > best.get(c, NEG):
            best[c] = v
    return best


# ----------------------------------------------------------------------------------------------- baselines


def beam_search(
    tables: QualityTables,
    costs: dict[str, float],
    budget: float,
    constraints: Constraints | None = None,
    width: int = 8,
    kv_bytes: dict[str, float] | None = None,
) -> tuple[tuple[str, ...], float] | None:
    """Layer-by-layer beam on the surrogate (width 1 = greedy): keep the ``width`` best partial placements
    that can still finish within budget. The baseline the exact DP is compared with."""
    cons = constraints or Constraints(tables.num_layers)
    L = tables.num_layers
    min_rest = [sum(min(costs[m] for m in cons.allowed[j]) for j in range(l, L)) for l in range(L + 1)]
    beams: list[tuple[tuple[str, ...], float, float]] = [((), tables.const, 0.0)]
    for l in range(L):
        cand = []
        for p, v, c in beams:
            for m in cons.allowed[l]:
                nc = c + costs[m]
                if nc + min_rest[l + 1] > budget + 1e-12:
                    continue
                q = p + (m,)
                fa_left = cons.min_fa - sum(x == "fa" for x in q)
                if fa_left > sum("fa" in cons.allowed[j] for j in range(l + 1, L)):
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
    kv_bytes: dict[str, float] | None = None,
    tries: int = 1000,
) -> tuple[str, ...]:
    """Mixer shares drawn from a flat Dirichlet per placement, then layers i.i.d. from those shares: covers
    mostly-FA to mostly-linear placements, unlike uniform per-layer draws that concentrate at 25% of each."""
    cons = constraints
    for _ in range(tries):
        shares = dict(zip(MIXER_NAMES, rng.dirichlet(np.ones(len(MIXER_NAMES))), strict=True))
        p = []
        for allowed in cons.allowed:
            w = np.array([shares[m] for m in allowed])
            p.append(allowed[int(rng.choice(len(allowed), p=w / w.sum()))])
        need = cons.min_fa - p.count("fa")
        if need > 0:
            slots = [l for l in range(cons.num_layers) if p[l] != "fa" and "fa" in cons.allowed[l]]
            for l in rng.choice(slots, size=need, replace=False):
                p[int(l)] = "fa"
        if cons.admits(p, kv_bytes):
            return tuple(p)
    raise InfeasibleError("could not draw a random placement satisfying the constraints (KV budget too tight?)")


def anchor_placements(constraints: Constraints, kv_bytes: dict[str, float] | None = None) -> list[tuple[str, ...]]:
    """all-FA plus 'as much of mixer m as the constraints allow' for each other mixer (required FA layers
    spread evenly): the ends of the front are then always measured."""
    cons = constraints
    L = cons.num_layers
    out = [("fa",) * L]
    for m in MIXER_NAMES[1:]:
        p = [m if m in a else a[-1] for a in cons.allowed]
        fa_slots = [l for l in range(L) if "fa" in cons.allowed[l] and p[l] != "fa"]
        need = cons.min_fa - p.count("fa")
        if need > 0:
            picks = [fa_slots[round((i + 0.5) * len(fa_slots) / need - 0.5)] for i in range(need)]
            for l in picks:
                p[l] = "fa"
        if cons.admits(p, kv_bytes) and tuple(p) not in out:
            out.append(tuple(p))
    return out


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class SearchSettings:
    evals: int = 24  # placements the guided search may evaluate (anchors + random start + active rounds)
    init_random: int = 8
    per_round: int = 4
    distance: int = 3
    thompson_samples: int = 8
    presets: int = 6
    steps_per_fa: int = 200
    beam_width: int = 8
    seed: int = 0
    baseline: bool = True  # run random search at the same evaluation budget for the report


@dataclass
class SearchResult:
    evaluated: dict[tuple[str, ...], float]  # guided search: placement -> measured quality
    baseline: dict[tuple[str, ...], float]  # random search at the same evaluation count
    front: list[FrontPoint]  # final predicted front
    presets: list[dict]
    cv: dict[str, dict[str, float]] = field(default_factory=dict)
    held_out: dict[str, dict[str, float]] = field(default_factory=dict)
    comparison: dict = field(default_factory=dict)
    rounds: int = 0


def select_active(
    surrogate: Surrogate,
    costs: dict[str, float],
    constraints: Constraints,
    evaluated: set[tuple[str, ...]],
    k: int,
    rng: np.random.Generator,
    samples: int,
    steps_per_fa: int,
    kv_bytes: dict[str, float] | None,
    kappa: float = 1.0,
) -> list[tuple[str, ...]]:
    """Thompson-sampled fronts (plus the posterior-mean front) propose candidates; in each of k cost bands the
    unevaluated candidate with the highest upper confidence bound (mean + kappa * std) is chosen; kappa=inf
    would be pure uncertainty sampling. Uncertainty *near the front*: candidates are only placements that
    some plausible surrogate calls Pareto-optimal, and within those the uncertain ones win unless others are
    predicted clearly better."""
    cand: dict[tuple[str, ...], float] = {}
    tables = [surrogate.tables()] + [surrogate.sample_tables(rng) for _ in range(samples)]
    for t in tables:
        for p in dp_front(t, costs, constraints, kv_bytes=kv_bytes, steps_per_fa=steps_per_fa):
            if p.placement not in evaluated:
                cand[p.placement] = sum(costs[m] for m in p.placement)
    if not cand:
        return []
    placements = list(cand)
    mean, std = surrogate.predict(placements, return_std=True)
    score = std if not np.isfinite(kappa) else mean + kappa * std
    lo, hi = min(cand.values()), max(cand.values())
    edges = np.linspace(lo, hi + 1e-12, k + 1)
    chosen: list[tuple[str, ...]] = []
    for b in range(k):
        band = [i for i, p in enumerate(placements) if edges[b] <= cand[p] < edges[b + 1] and p not in chosen]
        if band:
            chosen.append(placements[max(band, key=lambda i: score[i])])
    for i in np.argsort(-score):
        if len(chosen) >= k:
            break
        if placements[i] not in chosen:
            chosen.append(placements[i])
    return chosen[:k]


def choose_presets(
    front: Sequence[FrontPoint],
    surrogate: Surrogate,
    costs: dict[str, float],
    shared_cost: float,
    constraints: Constraints,
    n: int,
    max_cost: float | None,
    kv_bytes: dict[str, float] | None,
) -> list[dict]:
    """all-FA (when the constraints admit it) plus front points at speed-up targets spaced geometrically from
    ``1 / max_cost`` (or the first step) up to the cheapest front point."""
    L = constraints.num_layers
    cost = lambda p: shared_cost + sum(costs[m] for m in p)  # noqa: E731
    full = cost(("fa",) * L)
    top = full / cost(front[0].placement)
    out: list[dict] = []
    all_fa = ("fa",) * L
    if constraints.admits(all_fa, kv_bytes):
        out.append(
            {
                "placement": all_fa,
                "target_speedup": 1.0,
                "predicted_quality": float(surrogate.predict([all_fa])[0]),
            }
        )
    k = n - len(out)
    if k > 0 and top > 1.0:
        lo = min(max(1.0 / max_cost, 1.0), top) if max_cost else top ** (1 / k)
        targets = [lo * (top / lo) ** (i / max(k - 1, 1)) for i in range(k)] if k > 1 else [top]
        for t in targets:
            budget = full / t - shared_cost + 1e-9
            taken = {o["placement"] for o in out}
            # the best front point within budget; if an earlier target took it, the next cheaper one
            fits = [p for p in front if p.cost <= budget and p.placement not in taken]
            if fits:
                point = max(fits, key=lambda p: p.value)
                out.append({"placement": point.placement, "target_speedup": t, "predicted_quality": point.value})
    return out


def verify_presets(
    presets: list[dict],
    measured: dict[tuple[str, ...], float],
    surrogate: Surrogate,
    cost: Callable[[Sequence[str]], float],
    full_cost: float,
    constraints: Constraints,
    kv_bytes: dict[str, float] | None,
    max_cost: float | None,
) -> list[dict]:
    """Each DP pick stands for a speed band (its target up to the next preset's); if a placement already
    measured in that band scored higher than the pick, it replaces the pick (``source: measured``), so what
    ships is the best *measured* placement of each band. all-FA, the reference, always stays."""
    out: list[dict] = []
    for i, pr in enumerate(presets):
        pr = {**pr, "source": "dp"}
        if all(m == "fa" for m in pr["placement"]):
            out.append(pr)
            continue
        lo = pr["target_speedup"]
        hi = presets[i + 1]["target_speedup"] if i + 1 < len(presets) else float("inf")
        band = [
            p
            for p, q in measured.items()
            if lo - 1e-9 <= full_cost / cost(p) < hi
            and constraints.admits(p, kv_bytes)
            and (max_cost is None or cost(p) <= max_cost * full_cost + 1e-12)
        ]
        taken = {o["placement"] for o in out}
        options = [p for p in dict.fromkeys([pr["placement"], *band]) if p not in taken]
        if not options:
            continue
        best = max(options, key=lambda p: measured[p])
        if best != pr["placement"]:
            pr = {
                "placement": best,
                "target_speedup": lo,
                "source": "measured",
                "measured_quality": measured[best],
                "predicted_quality": float(surrogate.predict([best])[0]),
            }
        out.append(pr)
    # A preset that a faster one also beats on measured quality would never be the right choice: drop it, so
    # the shipped presets are a measured Pareto front.
    speed = lambda p: full_cost / cost(p["placement"])  # noqa: E731

    def dominated(p: dict) -> bool:
        if all(m == "fa" for m in p["placement"]):
            return False
        return any(o is not p and speed(o) >= speed(p) and o["measured_quality"] > p["measured_quality"] for o in out)

    return [p for p in out if not dominated(p)]


def front_area(
    points: dict[tuple[str, ...], float],
    cost: Callable[[Sequence[str]], float],
    full_cost: float,
    targets: Sequence[float],
    floor: float,
) -> tuple[float, list[float | None]]:
    """Best measured quality at speed-up >= each target (None when nothing that fast was measured), and their
    mean with ``floor`` for missing targets: one number to compare searches at equal evaluation budget."""
    best = []
    for t in targets:
        ok = [q for p, q in points.items() if full_cost / cost(p) >= t - 1e-9]
        best.append(max(ok) if ok else None)
    return float(np.mean([b if b is not None else floor for b in best])), best


def run_search(
    evaluate: Callable[[tuple[str, ...]], float],
    costs: dict[str, float],
    shared_cost: float,
    constraints: Constraints,
    settings: SearchSettings,
    *,
    kv_bytes: dict[str, float] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    max_cost: float | None = None,
) -> SearchResult:
    """sample -> evaluate -> fit -> optimise, then presets and (optionally) the random-search baseline.

    ``evaluate`` returns a placement's measured quality (backed by the results database, so a rerun after a
    kill replays every finished evaluation from disk); every random draw is seeded, so a rerun makes the same
    choices. ``max_cost`` (relative to all-FA) bounds the presets other than all-FA."""
    L = constraints.num_layers
    s = settings
    cost = lambda p: shared_cost + sum(costs[m] for m in p)  # noqa: E731
    full_cost = cost(("fa",) * L)
    rng = np.random.default_rng(s.seed)
    note = progress or (lambda stage, done, total: None)
    evaluated: dict[tuple[str, ...], float] = {}

    def run(batch: Sequence[tuple[str, ...]], stage: str) -> None:
        for p in batch:
            if p not in evaluated:
                evaluated[p] = evaluate(p)
                note(stage, len(evaluated), s.evals)

    start = anchor_placements(constraints, kv_bytes)
    randoms = [random_placement(rng, constraints, kv_bytes) for _ in range(s.init_random)]
    run([p for p in start + randoms][: s.evals], "initial")
    rounds = 0
    while len(evaluated) < s.evals:
        rounds += 1
        sur = Surrogate(L, s.distance, "bayes").fit(list(evaluated), list(evaluated.values()))
        rrng = np.random.default_rng([s.seed, rounds])
        batch = select_active(
            sur,
            costs,
            constraints,
            set(evaluated),
            min(s.per_round, s.evals - len(evaluated)),
            rrng,
            s.thompson_samples,
            s.steps_per_fa,
            kv_bytes,
        )
        if not batch:  # every candidate measured: fall back to random exploration
            batch = [random_placement(rrng, constraints, kv_bytes)]
        run(batch, f"round {rounds}")
    sur = Surrogate(L, s.distance, "bayes").fit(list(evaluated), list(evaluated.values()))
    front = dp_front(sur.tables(), costs, constraints, kv_bytes=kv_bytes, steps_per_fa=s.steps_per_fa)
    presets = choose_presets(front, sur, costs, shared_cost, constraints, s.presets, max_cost, kv_bytes)
    # presets are measured too (and count towards the evaluation budget the baseline gets)
    for pr in presets:
        if pr["placement"] not in evaluated:
            evaluated[pr["placement"]] = evaluate(pr["placement"])
            note("presets", len(evaluated), len(evaluated))
        pr["measured_quality"] = evaluated[pr["placement"]]
    presets = verify_presets(presets, evaluated, sur, cost, full_cost, constraints, kv_bytes, max_cost)
    result = SearchResult(evaluated, {}, front, presets, rounds=rounds)

    # Surrogate quality: cross-validated on what the search measured (biased towards the front), and on the
    # random baseline's placements, which the search never chose (an unbiased held-out set).
    placements, ys = list(evaluated), list(evaluated.values())
    for kind in ("bayes", "tree"):
        result.cv[kind] = _safe(
            lambda kind=kind: cross_validate(placements, ys, L, s.distance, kind, folds=5, seed=s.seed)
        )
    if s.baseline:
        # Same seed as the guided search: random search starts from the very same anchors and random draws (so
        # they are measured once) and then keeps drawing where the guided search starts choosing.
        brng = np.random.default_rng(s.seed)
        base = dict.fromkeys(start)
        while len(base) < len(evaluated):
            base[random_placement(brng, constraints, kv_bytes)] = None
        for i, p in enumerate(base):
            base[p] = evaluated[p] if p in evaluated else evaluate(p)
            note("random baseline", i + 1, len(base))
        result.baseline = dict(base)
        unseen = [p for p in base if p not in evaluated]
        for kind in ("bayes", "tree"):
            result.held_out[kind] = (
                _safe(
                    lambda kind=kind: held_out_scores(
                        placements, ys, unseen, [base[p] for p in unseen], L, s.distance, kind, s.seed
                    )
                )
                if len(unseen) >= 3
                else {"error": f"only {len(unseen)} held-out placements"}
            )
        floor = min(min(evaluated.values()), min(base.values()))
        targets = [p["target_speedup"] for p in presets]
        comp_targets = [t for t in targets if t > 1.0 + 1e-9] or targets
        g_score, g_best = front_area(evaluated, cost, full_cost, comp_targets, floor)
        r_score, r_best = front_area(base, cost, full_cost, comp_targets, floor)
        result.comparison = {
            "targets": comp_targets,
            "guided": g_best,
            "random": r_best,
            "guided_mean": g_score,
            "random_mean": r_score,
            "evaluations": len(evaluated),
        }
    # the DP against a beam/greedy search on the same surrogate, at every preset budget
    tables = sur.tables()
    beam_rows = []
    for pr in presets:
        budget = cost(pr["placement"]) - shared_cost
        for width in (1, s.beam_width):
            got = beam_search(tables, costs, budget + 1e-9, constraints, width, kv_bytes)
            beam_rows.append(
                {
                    "budget_speedup": full_cost / cost(pr["placement"]),
                    "width": width,
                    "dp": best_under_budget(front, budget + 1e-9).value,
                    "beam": None if got is None else got[1],
                    "placement": None if got is None else format_placement(got[0]),
                }
            )
    result.comparison["beam"] = beam_rows
    return result


def _safe(fn):
    try:
        return fn()
    except ValueError as err:  # too few points for a fold, constant targets, ...
        return {"error": str(err)}
