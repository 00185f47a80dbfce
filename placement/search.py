"""The sample -> evaluate -> fit -> optimise loop (active learning on the surrogate), the preset choice and its
verification against measurements, and the random-search baseline run at the same evaluation budget.

The optimiser itself is ``placement.dp`` (exact DP over layers); ``placement.baselines`` holds the beam/greedy
and random searches it is compared with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from placement.baselines import anchor_placements, beam_search, random_placement
from placement.constraints import Constraints, InfeasibleError
from placement.dp import FrontPoint, best_under_budget, dp_front
from placement.surrogate import Surrogate, cross_validate, held_out_scores
from supernet.placement import format_placement

__all__ = ["InfeasibleError", "PresetPick", "SearchResult", "SearchSettings", "run_search"]

Placement = tuple[str, ...]


@dataclass
class PresetPick:
    """One preset the search ships: the DP's pick for a speed-up target, or (``source="measured"``) a placement
    measured in the same speed band that beat it."""

    placement: Placement
    target_speedup: float
    predicted_quality: float
    measured_quality: float = float("nan")  # set once the pick is evaluated
    source: Literal["dp", "measured"] = "dp"


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
    presets: list[PresetPick]
    cv: dict[str, dict[str, Any]] = field(default_factory=dict)  # per surrogate kind: scores, or an error
    held_out: dict[str, dict[str, Any]] = field(default_factory=dict)
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
    kv_bytes: Mapping[str, float] | None,
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
    kv_bytes: Mapping[str, float] | None,
) -> list[PresetPick]:
    """all-FA (when the constraints admit it) plus front points at speed-up targets spaced geometrically from
    ``1 / max_cost`` (or the first step) up to the cheapest front point."""
    L = constraints.num_layers
    cost = lambda p: shared_cost + sum(costs[m] for m in p)  # noqa: E731
    full = cost(("fa",) * L)
    top = full / cost(front[0].placement)
    out: list[PresetPick] = []
    all_fa = ("fa",) * L
    if constraints.admits(all_fa, kv_bytes):
        out.append(PresetPick(all_fa, 1.0, float(surrogate.predict([all_fa])[0])))
    k = n - len(out)
    if k > 0 and top > 1.0:
        lo = min(max(1.0 / max_cost, 1.0), top) if max_cost else top ** (1 / k)
        targets = [lo * (top / lo) ** (i / max(k - 1, 1)) for i in range(k)] if k > 1 else [top]
        for t in targets:
            budget = full / t - shared_cost + 1e-9
            taken = {o.placement for o in out}
            # the best front point within budget; if an earlier target took it, the next cheaper one
            fits = [p for p in front if p.cost <= budget and p.placement not in taken]
            if fits:
                point = max(fits, key=lambda p: p.value)
                out.append(PresetPick(point.placement, t, point.value))
    return out


def verify_presets(
    presets: list[PresetPick],
    measured: dict[tuple[str, ...], float],
    surrogate: Surrogate,
    cost: Callable[[Sequence[str]], float],
    full_cost: float,
    constraints: Constraints,
    kv_bytes: Mapping[str, float] | None,
    max_cost: float | None,
) -> list[PresetPick]:
    """Each DP pick stands for a speed band (its target up to the next preset's); if a placement already
    measured in that band scored higher than the pick, it replaces the pick (``source: measured``), so what
    ships is the best *measured* placement of each band. all-FA, the reference, always stays."""
    out: list[PresetPick] = []
    for i, pr in enumerate(presets):
        pr = replace(pr, source="dp")
        if all(m == "fa" for m in pr.placement):
            out.append(pr)
            continue
        lo = pr.target_speedup
        hi = presets[i + 1].target_speedup if i + 1 < len(presets) else float("inf")
        band = [
            p
            for p, q in measured.items()
            if lo - 1e-9 <= full_cost / cost(p) < hi
            and constraints.admits(p, kv_bytes)
            and (max_cost is None or cost(p) <= max_cost * full_cost + 1e-12)
        ]
        taken = {o.placement for o in out}
        options = [p for p in dict.fromkeys([pr.placement, *band]) if p not in taken]
        if not options:
            continue
        best = max(options, key=lambda p: measured[p])
        if best != pr.placement:
            pr = PresetPick(best, lo, float(surrogate.predict([best])[0]), measured[best], "measured")
        out.append(pr)
    # A preset that a faster one also beats on measured quality would never be the right choice: drop it, so
    # the shipped presets are a measured Pareto front.
    def speed(p: PresetPick) -> float:
        return full_cost / cost(p.placement)

    def dominated(p: PresetPick) -> bool:
        if all(m == "fa" for m in p.placement):
            return False
        return any(o is not p and speed(o) >= speed(p) and o.measured_quality > p.measured_quality for o in out)

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
    kv_bytes: Mapping[str, float] | None = None,
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
        if pr.placement not in evaluated:
            evaluated[pr.placement] = evaluate(pr.placement)
            note("presets", len(evaluated), len(evaluated))
        pr.measured_quality = evaluated[pr.placement]
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
        drawn = dict.fromkeys(start)  # an ordered set
        while len(drawn) < len(evaluated):
            drawn[random_placement(brng, constraints, kv_bytes)] = None
        base: dict[Placement, float] = {}
        for i, p in enumerate(drawn):
            base[p] = evaluated[p] if p in evaluated else evaluate(p)
            note("random baseline", i + 1, len(drawn))
        result.baseline = base
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
        targets = [p.target_speedup for p in presets]
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
        budget = cost(pr.placement) - shared_cost
        for width in (1, s.beam_width):
            got = beam_search(tables, costs, budget + 1e-9, constraints, width, kv_bytes)
            beam_rows.append(
                {
                    "budget_speedup": full_cost / cost(pr.placement),
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
