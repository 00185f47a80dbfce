"""The token draw every sampled row goes through (plain and speculative decoding)."""

from __future__ import annotations

import torch

from serving.sampling import draw, make_generator
from tests.serving.test_spec_decode import _chi_square_p


def test_draw_follows_the_weights_and_never_draws_a_zero():
    """20,000 draws from 40 unnormalised weights, a quarter of them zero: the frequencies match the weights
    (Pearson chi-square, significance level 0.001) and no zero-weight token ever comes out."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(40, generator=gen) * 3
    weights[::4] = 0
    counts = torch.zeros(40, dtype=torch.float64)
    rng = make_generator(1)
    for _ in range(20_000):
        counts[draw(weights, rng)] += 1
    assert counts[::4].sum() == 0
    expected = weights.double() / weights.double().sum() * counts.sum()
    keep = weights > 0
    assert _chi_square_p(counts[keep], expected[keep]) > 0.001


def test_draw_is_reproducible_per_seed_and_handles_a_point_mass():
    probs = torch.softmax(torch.randn(1000, generator=torch.Generator().manual_seed(3)), -1)
    first = [draw(probs, g) for g in [make_generator(7)] for _ in range(50)]
    again = [draw(probs, g) for g in [make_generator(7)] for _ in range(50)]
    assert first == again and len(set(first)) > 10
    point = torch.zeros(1000)
    point[999] = 1.0
    assert {draw(point, make_generator(s)) for s in range(20)} == {999}
