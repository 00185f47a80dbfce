"""The in-place single-token decode kernels equal the general (copying) forms, and update states in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import causal_conv1d_update, recurrent_gated_delta_rule, recurrent_kda
from kernels.delta_rule.decode import conv_step_, delta_rule_step_
from kernels.linear import fused_linear, set_packed_enabled, use_packed
from tests.kernels.helpers import delta_inputs


@pytest.mark.parametrize("act", ["silu", None])
def test_conv_step_equals_conv_update_and_shifts_in_place(act) -> None:
    gen = torch.Generator().manual_seed(0)
    state = torch.randn(3, 10, 3, generator=gen)
    w = torch.randn(10, 4, generator=gen)
    ours = state.clone()
    for _ in range(5):  # several steps: the shifted state feeds the next one
        x = torch.randn(3, 10, generator=gen)
        ref, state = causal_conv1d_update(x, state, w, activation=act)
        y = conv_step_(x, ours, w, activation=act)
        torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours, state, atol=0, rtol=0)


@pytest.mark.parametrize("rule", ["gdn", "kda"])
def test_delta_rule_step_equals_recurrent_form(rule) -> None:
    d = delta_inputs(rule, B=3, T=6, initial_state=True, seed=1)
    recurrent = recurrent_gated_delta_rule if rule == "gdn" else recurrent_kda
    state_ref = d["initial_state"].clone()
    state = d["initial_state"].clone()
    for t in range(6):
        at = slice(t, t + 1)
        o_ref, state_ref = recurrent(
            d["q"][:, at], d["k"][:, at], d["v"][:, at], d["g"][:, at], d["beta"][:, at],
            initial_state=state_ref, output_final_state=True,
        )
        ptr = state.data_ptr()
        o = delta_rule_step_(d["q"][:, t], d["k"][:, t], d["v"][:, t], d["g"][:, t], d["beta"][:, t], state)
        assert state.data_ptr() == ptr  # updated in place, not replaced
        torch.testing.assert_close(o, o_ref[:, 0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(state, state_ref, atol=1e-6, rtol=1e-5)


def test_fused_linear_equals_separate_linears_and_follows_weight_updates() -> None:
    owner = torch.nn.Module()
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(384, 576, generator=gen), torch.randn(192, 576, generator=gen)]
    biases = [torch.randn(384, generator=gen), None]
    x = torch.randn(2, 1, 576, generator=gen)
    with torch.no_grad():
        assert use_packed(x) == torch.backends.mkldnn.is_available()
        ref = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)
        torch.testing.assert_close(fused_linear(x, owner, "wb", weights, biases), ref, atol=1e-4, rtol=1e-5)
        weights[0].mul_(2.0)  # an optimizer step or checkpoint load writes in place: the packed copy follows
        ref = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)
        torch.testing.assert_close(fused_linear(x, owner, "wb", weights, biases), ref, atol=1e-4, rtol=1e-5)
        previous = set_packed_enabled(False)
        try:
            assert not use_packed(x)
        finally:
            set_packed_enabled(previous)
    assert not use_packed(x.requires_grad_())  # autograd never takes the packed path
    prompt = torch.randn(2, 300, 576, generator=gen)
    with torch.no_grad():
        assert not use_packed(prompt)  # prefill-sized calls in a plain no_grad block (training) stay on F.linear
    with torch.inference_mode():  # ... and take it in inference mode (engine, evaluation), equal to F.linear
        assert use_packed(prompt) == torch.backends.mkldnn.is_available()
        ref = torch.cat([F.linear(prompt, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)
        torch.testing.assert_close(fused_linear(prompt, owner, "wb", weights, biases), ref, atol=1e-4, rtol=1e-5)


def test_bf16_takes_the_packed_path_where_onednn_has_bf16() -> None:
    """A bf16 model's decode products run on packed bf16 weights (half the bytes of fp32) where oneDNN supports
    bf16, and equal the fp32 product to bf16 rounding."""
    from kernels.linear import PACKED_DTYPES, linear

    owner = torch.nn.Module()
    gen = torch.Generator().manual_seed(4)
    weight, x = torch.randn(512, 576, generator=gen) / 24, torch.randn(3, 1, 576, generator=gen)
    with torch.inference_mode():
        xb, wb = x.bfloat16(), weight.bfloat16()
        assert use_packed(xb) == (torch.bfloat16 in PACKED_DTYPES)
        got = linear(xb, wb, None, owner)
        assert got.dtype is torch.bfloat16
        assert ("weight" in owner.__dict__.get("_derived_weights", {})) == (torch.bfloat16 in PACKED_DTYPES)
        torch.testing.assert_close(got.float(), F.linear(x, weight), atol=0.05, rtol=0.02)
