"""Norms against their textbook formulas, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import gated_rms_norm, l2_norm, rms_norm
from tests.kernels.helpers import fp32_tol, max_err


@pytest.fixture
def x():
    return torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3


def test_l2_norm(x) -> None:
    ref = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    assert max_err(l2_norm(x), ref) <= fp32_tol(ref, terms=4)
    assert max_err(l2_norm(x).norm(dim=-1), torch.ones(3, 5)) <= 1e-5
    assert torch.isfinite(l2_norm(torch.zeros(2, 8))).all()


def test_rms_norm(x) -> None:
    w = torch.rand(64) + 0.5
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert max_err(rms_norm(x, w), ref) <= fp32_tol(ref, terms=4)


@pytest.mark.parametrize("act", ["silu", "sigmoid"])
def test_gated_rms_norm(x, act) -> None:
    w = torch.rand(64) + 0.5
    gate = torch.randn_like(x)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    ref = ref * (F.silu(gate) if act == "silu" else torch.sigmoid(gate))
    assert max_err(gated_rms_norm(x, gate, w, eps=1e-5, activation=act), ref) <= fp32_tol(ref, terms=4)
    with pytest.raises(ValueError, match="activation"):
        gated_rms_norm(x, gate, w, activation="tanh")


def test_bf16_computes_in_fp32(x) -> None:
    """bf16 in, bf16 out, and the result equals the fp32 computation rounded once."""
    xb = x.bfloat16()
    w = (torch.rand(64) + 0.5).bfloat16()
    gate = torch.randn_like(x).bfloat16()
    for got, ref in (
        (l2_norm(xb), l2_norm(xb.float())),
        (rms_norm(xb, w), rms_norm(xb.float(), w.float())),
        (gated_rms_norm(xb, gate, w), gated_rms_norm(xb.float(), gate.float(), w.float())),
    ):
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, ref.bfloat16())
