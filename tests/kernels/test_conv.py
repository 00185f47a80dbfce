"""Causal depthwise conv: prefill vs F.conv1d, prefill + decode == prefill, states, varlen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import causal_conv1d, causal_conv1d_update
from tests.kernels.helpers import fp32_tol, max_err


def conv_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, prefix: torch.Tensor | None,
                   act: str | None) -> torch.Tensor:
    """Plain F.conv1d over [prefix | x] (prefix = previous inputs, zeros when None)."""
    B, T, C = x.shape
    W = w.shape[1]
    prefix = torch.zeros(B, C, W - 1) if prefix is None else prefix
    full = torch.cat([prefix, x.transpose(1, 2)], dim=2)
    y = F.conv1d(full, w[:, None, :], b, groups=C)[:, :, -T:].transpose(1, 2)
    return F.silu(y) if act == "silu" else y


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 23, 10, generator=gen)
    w = torch.randn(10, 4, generator=gen)
    b = torch.randn(10, generator=gen)
    h0 = torch.randn(2, 10, 3, generator=gen)
    return x, w, b, h0


@pytest.mark.parametrize("act", ["silu", None])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("use_state", [True, False])
def test_matches_conv1d(data, act, use_bias, use_state) -> None:
    x, w, b, h0 = data
    b = b if use_bias else None
    h0 = h0 if use_state else None
    y, s = causal_conv1d(x, w, b, activation=act, initial_state=h0, output_final_state=True)
    ref = conv_reference(x, w, b, h0, act)
    assert max_err(y, ref) <= fp32_tol(ref, terms=4)
    full = torch.cat([torch.zeros(2, 10, 3) if h0 is None else h0, x.transpose(1, 2)], dim=2)
    assert torch.equal(s, full[:, :, -3:])


def test_short_input_state_keeps_older_prefix(data) -> None:
    """With T < W - 1 the new state must still hold the tail of the previous state."""
    x, w, b, h0 = data
    _, s = causal_conv1d(x[:, :2], w, b, initial_state=h0, output_final_state=True)
    assert torch.equal(s, torch.cat([h0[:, :, 2:], x[:, :2].transpose(1, 2)], dim=2))


def test_prefill_then_decode_equals_prefill(data) -> None:
    x, w, b, h0 = data
    y_all, s_all = causal_conv1d(x, w, b, initial_state=h0, output_final_state=True)
    y_head, state = causal_conv1d(x[:, :9], w, b, initial_state=h0, output_final_state=True)
    ys = [y_head]
    for t in range(9, 20):  # single tokens ([B, C])
        y_t, state = causal_conv1d_update(x[:, t], state, w, b)
        assert y_t.shape == (2, 10)
        ys.append(y_t[:, None])
    y_blk, state = causal_conv1d_update(x[:, 20:], state, w, b)  # a few tokens at once ([B, T, C])
    ys.append(y_blk)
    assert max_err(torch.cat(ys, dim=1), y_all) <= fp32_tol(y_all, terms=4)
    assert torch.equal(state, s_all)


def test_update_does_not_modify_state(data) -> None:
    x, w, b, h0 = data
    keep = h0.clone()
    _, new = causal_conv1d_update(x[:, 0], h0, w, b)
    assert torch.equal(h0, keep) and not torch.equal(new, keep)


@pytest.mark.parametrize("use_state", [True, False])
def test_varlen_resets_at_boundaries(data, use_state) -> None:
    x, w, b, _ = data
    lens = [1, 7, 2, 13]
    cu = torch.tensor([0, 1, 8, 10, 23])
    packed = x[:1]
    h0 = torch.randn(4, 10, 3) if use_state else None
    y, s = causal_conv1d(packed, w, b, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for i in range(len(lens)):
        a, e = cu[i].item(), cu[i + 1].item()
        hi = None if h0 is None else h0[i : i + 1]
        y_i, s_i = causal_conv1d(packed[:, a:e], w, b, initial_state=hi, output_final_state=True)
        assert max_err(y[:, a:e], y_i) <= fp32_tol(y_i, terms=4)
        assert torch.equal(s[i : i + 1], s_i)


def test_bf16_and_gradients(data) -> None:
    x, w, b, h0 = data
    y16, s16 = causal_conv1d(x.bfloat16(), w, b, initial_state=h0.bfloat16(), output_final_state=True)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.bfloat16
    y32 = conv_reference(x.bfloat16().float(), w, b, h0.bfloat16().float(), "silu")
    assert max_err(y16, y32) <= 2e-2 * y32.abs().max().item()
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    causal_conv1d(xs, ws, b)[0].square().sum().backward()
    conv_reference(xr, wr, b, None, "silu").square().sum().backward()
    assert max_err(xs.grad, xr.grad) <= 1e-4 and max_err(ws.grad, wr.grad) <= 1e-4


def test_bad_activation(data) -> None:
    x, w, b, _ = data
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, b, activation="relu")
