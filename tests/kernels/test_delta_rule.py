"""Chunked vs recurrent vs naive forms of GDN and KDA: outputs, final states, gradients, varlen, dtypes."""

from __future__ import annotations

import pytest
import torch

from kernels import (
    chunk_gated_delta_rule,
    chunk_kda,
    naive_delta_rule,
    recurrent_gated_delta_rule,
    recurrent_kda,
)
from kernels.fla import use_fla
from tests.kernels.helpers import delta_inputs, fp32_tol, max_err

CHUNK = {"gdn": chunk_gated_delta_rule, "kda": chunk_kda}
RECURRENT = {"gdn": recurrent_gated_delta_rule, "kda": recurrent_kda}
RULES = ["gdn", "kda"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_and_recurrent_match_naive(rule: str, T: int, with_state: bool) -> None:
    x = delta_inputs(rule, B=2, T=T, initial_state=with_state, seed=T)
    o_ref, s_ref = naive_delta_rule(**x, output_final_state=True)
    for fn in (CHUNK[rule], RECURRENT[rule]):
        o, s = fn(**x, output_final_state=True)
        assert o.shape == x["v"].shape and o.dtype == x["v"].dtype
        assert s.shape == (2, 2, 16, 12) and s.dtype == torch.float32
        assert max_err(o, o_ref) <= fp32_tol(o_ref), fn.__name__
        assert max_err(s, s_ref) <= fp32_tol(s_ref), fn.__name__


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk_size", [1, 10, 16, 32, 48, 64, 128])
def test_chunk_size_does_not_change_results(rule: str, chunk_size: int) -> None:
    """Any chunk size (non powers of two included) is the same math, only blocked differently."""
    x = delta_inputs(rule, B=1, T=150, initial_state=True, seed=3)
    o_ref, s_ref = naive_delta_rule(**x, output_final_state=True)
    o, s = CHUNK[rule](**x, output_final_state=True, chunk_size=chunk_size)
    assert max_err(o, o_ref) <= fp32_tol(o_ref) and max_err(s, s_ref) <= fp32_tol(s_ref)


@pytest.mark.parametrize("rule", RULES)
def test_other_head_dims_and_scale(rule: str) -> None:
    x = delta_inputs(rule, B=1, T=90, H=3, K=24, V=40, initial_state=True, seed=5)
    o_ref, s_ref = naive_delta_rule(**x, scale=0.3, output_final_state=True)
    o, s = CHUNK[rule](**x, scale=0.3, output_final_state=True)
    assert max_err(o, o_ref) <= fp32_tol(o_ref) and max_err(s, s_ref) <= fp32_tol(s_ref)
    o, s = RECURRENT[rule](**x, scale=0.3, output_final_state=True)
    assert max_err(o, o_ref) <= fp32_tol(o_ref) and max_err(s, s_ref) <= fp32_tol(s_ref)


def test_kda_fast_and_slow_channels_stay_finite_and_exact() -> None:
    """Channels forgetting at g = -5..-20 per token (cumulative -1000 per chunk) next to non-decaying ones."""
    x = delta_inputs("kda", B=1, T=130, K=16, initial_state=True, seed=7)
    g = x["g"]
    g[..., :4] = -20.0
    g[..., 4:8] = -5.0
    g[..., 8:10] = 0.0
    names = ["q", "k", "v", "g", "beta", "initial_state"]

    def run(fn):
        leaves = {n: x[n].clone().requires_grad_(True) for n in names}
        o, s = fn(**leaves, output_final_state=True)
        (o.square().sum() + s.square().sum()).backward()
        return o, s, {n: leaves[n].grad for n in names}

    o_ref, s_ref, g_ref = run(naive_delta_rule)
    o, s, grads = run(chunk_kda)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert max_err(o, o_ref) <= fp32_tol(o_ref) and max_err(s, s_ref) <= fp32_tol(s_ref)
    for n in names:
        assert torch.isfinite(grads[n]).all(), n
        assert max_err(grads[n], g_ref[n]) <= 1e-4 * max(1.0, g_ref[n].abs().max().item()), n


@pytest.mark.parametrize("rule", RULES)
def test_no_output_state_and_inputs_untouched(rule: str) -> None:
    x = delta_inputs(rule, B=1, T=20, initial_state=True, seed=11)
    h0 = x["initial_state"].clone()
    for fn in (CHUNK[rule], RECURRENT[rule]):
        o, s = fn(**x)
        assert s is None
        assert torch.equal(x["initial_state"], h0), "initial_state must not be modified in place"


@pytest.mark.parametrize("rule", RULES)
def test_chunk_gradients_match_naive(rule: str) -> None:
    x = delta_inputs(rule, B=1, T=70, H=2, K=8, V=6, initial_state=True, seed=13)
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    gen = torch.Generator().manual_seed(0)
    do = torch.randn(x["v"].shape, generator=gen)
    ds = torch.randn(x["initial_state"].shape, generator=gen)

    def grads(fn):
        leaves = {n: x[n].clone().requires_grad_(True) for n in names}
        o, s = fn(**leaves, output_final_state=True)
        ((o * do).sum() + (s * ds).sum()).backward()
        return {n: leaves[n].grad for n in names}

    ref = grads(naive_delta_rule)
    for fn in (CHUNK[rule], RECURRENT[rule]):
        got = grads(fn)
        for n in names:
            scale = ref[n].abs().max().item()
            assert max_err(got[n], ref[n]) <= 1e-4 * max(1.0, scale), (fn.__name__, n)


def test_training_after_inference_mode_with_the_same_chunk_size() -> None:
    """Serving or evaluation under ``torch.inference_mode`` first, then training in the same process (a run
    that evaluates between steps): tensors cached by the first call must still be usable by autograd."""
    x = delta_inputs("kda", B=1, T=40, H=2, K=8, V=6, seed=17)
    with torch.inference_mode():
        chunk_kda(**x, chunk_size=24)  # 24: a size no other test caches first
    leaves = {n: x[n].clone().requires_grad_(True) for n in ("q", "k", "v")}
    o, _ = chunk_kda(**{**x, **leaves}, chunk_size=24)
    o.sum().backward()
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves.values())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("lens", [[5, 64, 1, 0, 130, 17], [60, 64, 50]], ids=["uneven", "similar"])
def test_varlen_equals_separate_sequences(rule: str, with_state: bool, lens: list[int]) -> None:
    """Uneven lengths take the end-to-end layout with scan restarts, similar ones the batched layout."""
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x = delta_inputs(rule, B=1, T=sum(lens), initial_state=with_state, n_states=len(lens), seed=17)
    for fn in (CHUNK[rule], RECURRENT[rule]):
        o, s = fn(**x, output_final_state=True, cu_seqlens=cu)
        assert o.shape == x["v"].shape and s.shape[0] == len(lens)
        for i in range(len(lens)):
            a, b = cu[i].item(), cu[i + 1].item()
            part = {n: x[n][:, a:b] for n in ("q", "k", "v", "g", "beta")}
            h0 = None if x["initial_state"] is None else x["initial_state"][i : i + 1]
            o_i, s_i = naive_delta_rule(**part, initial_state=h0, output_final_state=True)
            assert max_err(o[:, a:b], o_i) <= fp32_tol(o_i), (fn.__name__, i)
            assert max_err(s[i : i + 1], s_i) <= fp32_tol(s_i), (fn.__name__, i)


@pytest.mark.parametrize("rule", RULES)
def test_prefill_then_decode_equals_whole(rule: str) -> None:
    """chunk(prefix) -> final state -> recurrent one token at a time == chunk(whole sequence)."""
    x = delta_inputs(rule, B=2, T=100, initial_state=True, seed=19)
    o_all, s_all = CHUNK[rule](**x, output_final_state=True)
    split = 67
    head = {n: x[n][:, :split] for n in ("q", "k", "v", "g", "beta")}
    o_head, state = CHUNK[rule](**head, initial_state=x["initial_state"], output_final_state=True)
    outs = [o_head]
    for t in range(split, 100):
        step = {n: x[n][:, t : t + 1] for n in ("q", "k", "v", "g", "beta")}
        o_t, state = RECURRENT[rule](**step, initial_state=state, output_final_state=True)
        outs.append(o_t)
    assert max_err(torch.cat(outs, dim=1), o_all) <= fp32_tol(o_all)
    assert max_err(state, s_all) <= fp32_tol(s_all)


@pytest.mark.parametrize("rule", RULES)
def test_decode_batch_of_sequences_as_varlen(rule: str) -> None:
    """Serving-style decode: N sequences, one token each, packed with cu_seqlens == batch of N."""
    x = delta_inputs(rule, B=6, T=1, initial_state=True, seed=23)
    o_b, s_b = RECURRENT[rule](**x, output_final_state=True)
    packed = {n: x[n].transpose(0, 1) for n in ("q", "k", "v", "g", "beta")}  # [1, 6, ...]
    o_v, s_v = RECURRENT[rule](**packed, initial_state=x["initial_state"], output_final_state=True,
                               cu_seqlens=torch.arange(7))
    assert max_err(o_v.transpose(0, 1), o_b) <= fp32_tol(o_b) and max_err(s_v, s_b) <= fp32_tol(s_b)


@pytest.mark.parametrize("rule", RULES)
def test_bf16_inputs_keep_fp32_state(rule: str) -> None:
    x = delta_inputs(rule, B=1, T=100, initial_state=True, seed=29)
    xb = {n: t.to(torch.bfloat16) for n, t in x.items()}
    # fp32 run on the same (bf16-rounded) values: the only difference left is the final cast of o.
    xr = {n: t.float() for n, t in xb.items()}
    o_ref, s_ref = naive_delta_rule(**xr, output_final_state=True)
    for fn in (CHUNK[rule], RECURRENT[rule]):
        o, s = fn(**xb, output_final_state=True)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert max_err(o, o_ref) <= 1e-2 * max(1.0, o_ref.abs().max().item())
        assert max_err(s, s_ref) <= 1e-4
    # And close to the full-precision run on the original inputs.
    o32, _ = naive_delta_rule(**x)
    o, _ = CHUNK[rule](**xb)
    assert max_err(o, o32) <= 0.1


@pytest.mark.parametrize("rule", RULES)
def test_autocast_region_leaves_the_scans_in_fp32(rule: str) -> None:
    """Inside a bf16 autocast region (training's run.autocast) the scans still compute in fp32: the same
    bits as outside it, not bf16-rounded matmuls."""
    x = delta_inputs(rule, B=2, T=100, initial_state=True, seed=31)
    for fn in (CHUNK[rule], RECURRENT[rule]):
        o_ref, s_ref = fn(**x, output_final_state=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, s = fn(**x, output_final_state=True)
        assert o.dtype == s.dtype == torch.float32
        assert torch.equal(o, o_ref) and torch.equal(s, s_ref)


def test_bad_shapes_raise_clear_errors() -> None:
    x = delta_inputs("gdn", B=1, T=8)
    with pytest.raises(ValueError, match="g must be"):
        chunk_kda(**x)  # GDN-shaped g passed to KDA
    with pytest.raises(ValueError, match="beta"):
        chunk_gated_delta_rule(**{**x, "beta": x["beta"][..., None]})
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_gated_delta_rule(**x, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="initial_state"):
        recurrent_gated_delta_rule(**{**x, "initial_state": torch.zeros(2, 2, 16, 12)})  # N=2 but B=1


def test_cpu_never_routes_to_fla() -> None:
    assert not use_fla(torch.zeros(1))


@pytest.mark.parametrize("rule", RULES)
def test_non_contiguous_inputs(rule: str) -> None:
    """Mixers slice q, k, v out of one fused projection and may pass a broadcast decay: views must work."""
    x = delta_inputs(rule, B=2, T=70, H=2, K=16, V=16, initial_state=True, seed=37)
    fused = torch.cat([x["q"], x["k"], x["v"]], dim=-1)  # [B, T, H, 48]
    q, k, v = fused.split(16, dim=-1)
    beta = x["beta"].transpose(0, 1).contiguous().transpose(0, 1)
    h0 = x["initial_state"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not (q.is_contiguous() or beta.is_contiguous() or h0.is_contiguous())
    args = {"q": q, "k": k, "v": v, "g": x["g"], "beta": beta, "initial_state": h0}
    o_ref, s_ref = naive_delta_rule(**x, output_final_state=True)
    for fn in (CHUNK[rule], RECURRENT[rule]):
        o, s = fn(**args, output_final_state=True)
        assert max_err(o, o_ref) <= fp32_tol(o_ref) and max_err(s, s_ref) <= fp32_tol(s_ref)


@pytest.mark.parametrize("rule", RULES)
def test_empty_sequence(rule: str) -> None:
    x = delta_inputs(rule, B=2, T=0, initial_state=True)
    for fn in (CHUNK[rule], RECURRENT[rule]):
        o, s = fn(**x, output_final_state=True)
        assert o.shape == (2, 0, 2, 12) and torch.equal(s, x["initial_state"])


@pytest.mark.parametrize("rule", RULES)
def test_chunk_groups_carry_state_and_gradients(rule: str, monkeypatch) -> None:
    """Long inputs are processed in groups of chunks; force one chunk per group so that the state handoff
    between groups (and the varlen restarts across them) is exercised on small inputs."""
    from kernels.delta_rule import chunk as chunk_module

    monkeypatch.setattr(chunk_module, "_GROUP_ROWS", 1)
    x = delta_inputs(rule, B=1, T=150, H=2, K=8, V=6, initial_state=True, seed=41)
    names = ["q", "k", "v", "g", "beta", "initial_state"]

    def run(fn, **kw):
        leaves = {n: x[n].clone().requires_grad_(True) for n in names}
        o, s = fn(**leaves, output_final_state=True, **kw)
        (o.square().sum() + s.square().sum()).backward()
        return o, s, {n: leaves[n].grad for n in names}

    o, s, grads = run(CHUNK[rule], chunk_size=16)
    o_ref, s_ref, g_ref = run(naive_delta_rule)
    assert max_err(o, o_ref) <= fp32_tol(o_ref) and max_err(s, s_ref) <= fp32_tol(s_ref)
    for n in names:
        assert max_err(grads[n], g_ref[n]) <= 1e-4 * max(1.0, g_ref[n].abs().max().item()), n

    cu = torch.tensor([0, 5, 6, 150])  # uneven enough for the end-to-end layout with scan restarts
    h0 = torch.randn(3, 2, 8, 6, generator=torch.Generator().manual_seed(1))
    args = {n: x[n] for n in ("q", "k", "v", "g", "beta")}
    o, s = CHUNK[rule](**args, initial_state=h0, output_final_state=True, cu_seqlens=cu, chunk_size=16)
    o_ref, s_ref = naive_delta_rule(**args, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert max_err(o, o_ref) <= fp32_tol(o_ref) and max_err(s, s_ref) <= fp32_tol(s_ref)
