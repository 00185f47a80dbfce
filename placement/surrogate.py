"""Quality surrogate: predict a placement's quality from its per-layer mixers, with uncertainty.

Model (Super Apriel's): Bayesian linear regression (scikit-learn ``BayesianRidge``) on

* per-layer indicators ``[mixer of layer l == m]`` for every non-reference mixer m (the reference, FA, is the
  baseline absorbed by the intercept), and
* pairwise indicators ``[layer l-k == a and layer l == b]`` for non-reference a, b and distances k =
  1..``distance``, and
* mixer counts (how many layers use m): redundant with the per-layer indicators, but under one shared prior
  they let a few dozen measurements learn "each GDN layer costs about this much" first and per-layer
  deviations second (a hierarchical prior in effect); they fold back into the per-layer table, so the DP stays
  exact.

Reference coding loses nothing: any function that is a sum of per-layer terms and pairwise terms up to that
distance is exactly representable, and the coefficients read back directly as the tables the exact DP
optimises (:class:`QualityTables`). The posterior covariance gives predictive std and Thompson samples of
whole tables, which is how the search asks "where near the front are we unsure" (search.py).

A tree ensemble (random forest on the plain one-hots; it can find interactions by itself) is the comparison
model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from supernet.config import MIXER_NAMES

REFERENCE = "fa"


@dataclass
class QualityTables:
    """quality(p) = const + sum_l unary[l, p_l] + sum_l sum_k pair[l, k, p_{l-k-1}, p_l] (k < distance)."""

    const: float
    unary: np.ndarray  # [L, M]
    pair: np.ndarray  # [L, d, M, M]; zero where l-k-1 < 0
    mixers: tuple[str, ...] = MIXER_NAMES

    @property
    def num_layers(self) -> int:
        return self.unary.shape[0]

    @property
    def distance(self) -> int:
        return self.pair.shape[1]

    def index(self, placement: Sequence[str]) -> list[int]:
        return [self.mixers.index(m) for m in placement]

    def value(self, placement: Sequence[str]) -> float:
        idx = self.index(placement)
        v = self.const + sum(self.unary[l, m] for l, m in enumerate(idx))
        for l, m in enumerate(idx):
            for k in range(self.distance):
                if l - k - 1 >= 0:
                    v += self.pair[l, k, idx[l - k - 1], m]
        return float(v)


class FeatureMap:
    """Placement -> indicator features (see module docstring); ``decode`` maps linear weights back to
    tables."""

    def __init__(
        self,
        num_layers: int,
        distance: int = 3,
        mixers: Sequence[str] = MIXER_NAMES,
        reference: str = REFERENCE,
    ) -> None:
        self.num_layers, self.distance, self.mixers = num_layers, distance, tuple(mixers)
        self.others = [i for i, m in enumerate(self.mixers) if m != reference]
        self.main: list[tuple[int, int]] = [(l, m) for l in range(num_layers) for m in self.others]
        self.pairs: list[tuple[int, int, int, int]] = [
            (l, k, a, b)
            for l in range(num_layers)
            for k in range(distance)
            if l - k - 1 >= 0
            for a in self.others
            for b in self.others
        ]
        self._main_index = {key: i for i, key in enumerate(self.main)}

    @property
    def size(self) -> int:
        return len(self.main) + len(self.pairs) + len(self.others)

    def transform(self, placements: Sequence[Sequence[str]]) -> np.ndarray:
        x = np.zeros((len(placements), self.size), dtype=np.float64)
        lookup = {m: i for i, m in enumerate(self.mixers)}
        pair_index = {key: len(self.main) + i for i, key in enumerate(self.pairs)}
        count_index = {m: len(self.main) + len(self.pairs) + i for i, m in enumerate(self.others)}
        for row, p in enumerate(placements):
            if len(p) != self.num_layers:
                raise ValueError(f"placement has {len(p)} layers, surrogate expects {self.num_layers}")
            idx = [lookup[m] for m in p]
            for l, m in enumerate(idx):
                if (l, m) in self._main_index:
                    x[row, self._main_index[(l, m)]] = 1.0
                    x[row, count_index[m]] += 1.0
                for k in range(self.distance):
                    j = pair_index.get((l, k, idx[l - k - 1], m)) if l - k - 1 >= 0 else None
                    if j is not None:
                        x[row, j] = 1.0
        return x

    def one_hot(self, placements: Sequence[Sequence[str]]) -> np.ndarray:
        """Plain per-layer one-hots (for the tree model)."""
        lookup = {m: i for i, m in enumerate(self.mixers)}
        x = np.zeros((len(placements), self.num_layers * len(self.mixers)))
        for row, p in enumerate(placements):
            for l, m in enumerate(p):
                x[row, l * len(self.mixers) + lookup[m]] = 1.0
        return x

    def decode(self, coef: np.ndarray, intercept: float) -> QualityTables:
        m = len(self.mixers)
        unary = np.zeros((self.num_layers, m))
        pair = np.zeros((self.num_layers, self.distance, m, m))
        for (l, mi), w in zip(self.main, coef[: len(self.main)], strict=True):
            unary[l, mi] = w
        n_pairs = len(self.main) + len(self.pairs)
        for (l, k, a, b), w in zip(self.pairs, coef[len(self.main) : n_pairs], strict=True):
            pair[l, k, a, b] = w
        for m, w in zip(self.others, coef[n_pairs:], strict=True):
            unary[:, m] += w
        return QualityTables(float(intercept), unary, pair, self.mixers)


class Surrogate:
    """``kind="bayes"`` (BayesianRidge on interaction features, the model the DP optimises) or ``"tree"``
    (RandomForest on one-hots, for comparison only)."""

    def __init__(
        self,
        num_layers: int,
        distance: int = 3,
        kind: str = "bayes",
        mixers: Sequence[str] = MIXER_NAMES,
        seed: int = 0,
    ) -> None:
        if kind not in ("bayes", "tree"):
            raise ValueError(f"surrogate kind {kind!r}: expected 'bayes' or 'tree'")
        if distance < 0:
            raise ValueError(f"interaction distance must be >= 0, got {distance}")
        self.kind, self.seed = kind, seed
        self.features = FeatureMap(num_layers, distance, mixers)
        self.model: Any = None  # a fitted scikit-learn regressor after fit()
        self._chol: np.ndarray | None = None

    def _x(self, placements: Sequence[Sequence[str]]) -> np.ndarray:
        return self.features.transform(placements) if self.kind == "bayes" else self.features.one_hot(placements)

    def fit(self, placements: Sequence[Sequence[str]], y: Sequence[float]) -> Surrogate:
        if len(placements) < 2:
            raise ValueError("need at least 2 evaluated placements to fit a surrogate")
        if self.kind == "bayes":
            from sklearn.linear_model import BayesianRidge

            self.model = BayesianRidge(max_iter=500, compute_score=False)
        else:
            from sklearn.ensemble import RandomForestRegressor

            self.model = RandomForestRegressor(n_estimators=100, random_state=self.seed, n_jobs=1)
        self.model.fit(self._x(placements), np.asarray(y, dtype=np.float64))
        self._chol = None
        return self

    def predict(self, placements: Sequence[Sequence[str]], return_std: bool = False):
        x = self._x(placements)
        if self.kind == "bayes":
            return self.model.predict(x, return_std=return_std)
        mean = self.model.predict(x)
        if not return_std:
            return mean
        per_tree = np.stack([t.predict(x) for t in self.model.estimators_])
        return mean, per_tree.std(axis=0)

    def tables(self) -> QualityTables:
        if self.kind != "bayes":
            raise ValueError("only the Bayesian linear surrogate has tables for the DP")
        return self.features.decode(self.model.coef_, self.model.intercept_)

    def sample_tables(self, rng: np.random.Generator) -> QualityTables:
        """Tables drawn from the posterior over weights (Thompson sampling); the Cholesky factor is computed
        once per fit."""
        if self._chol is None:
            sigma = self.model.sigma_
            jitter = 1e-10 * max(float(np.trace(sigma)) / len(sigma), 1e-12)
            self._chol = np.linalg.cholesky(sigma + jitter * np.eye(len(sigma)))
        coef = self.model.coef_ + self._chol @ rng.standard_normal(len(self.model.coef_))
        return self.features.decode(coef, self.model.intercept_)


def rank_scores(truth: Sequence[float], pred: Sequence[float] | np.ndarray) -> dict[str, float]:
    from scipy.stats import kendalltau, spearmanr

    t, p = np.asarray(truth, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    rmse = float(np.sqrt(np.mean((t - p) ** 2)))
    if len(t) < 3 or np.all(t == t[0]) or np.all(p == p[0]):
        return {"spearman": float("nan"), "kendall": float("nan"), "rmse": rmse, "n": len(t)}
    return {
        "spearman": float(spearmanr(t, p).statistic),
        "kendall": float(kendalltau(t, p).statistic),
        "rmse": rmse,
        "n": len(t),
    }


def cross_validate(
    placements: Sequence[Sequence[str]],
    y: Sequence[float],
    num_layers: int,
    distance: int = 3,
    kind: str = "bayes",
    folds: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Out-of-fold predictions for every placement, then rank correlation against the truth."""
    n = len(placements)
    folds = min(folds, n)
    order = np.random.default_rng(seed).permutation(n)
    pred = np.zeros(n)
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        model = Surrogate(num_layers, distance, kind, seed=seed).fit(
            [placements[i] for i in train], [y[i] for i in train]
        )
        pred[test] = model.predict([placements[i] for i in test])
    return rank_scores(y, pred)


def held_out_scores(
    train_p, train_y, test_p, test_y, num_layers: int, distance: int = 3, kind: str = "bayes", seed: int = 0
) -> dict[str, float]:
    model = Surrogate(num_layers, distance, kind, seed=seed).fit(train_p, train_y)
    return rank_scores(test_y, model.predict(test_p))
