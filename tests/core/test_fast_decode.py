"""The fast paths (packed weights, in-place GDN/KDA steps, the C kernels) against the reference path: decode step
by step, and prefill/scoring, which take the packed weights under inference mode."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu as cpu_kernels
from supernet.cache import KVCache
from supernet.fastpath import reference_path
from tests.core.helpers import perturbed
from tests.threads import torch_threads

PLACEMENTS = ["all-fa", "all-swa", "all-gdn", "all-kda", "fa,swa,gdn,kda"]


@pytest.fixture(scope="module")
def model(tiny_supernet):
    return perturbed(tiny_supernet, seed=7)


@pytest.fixture(autouse=True, params=["c-kernels", "torch"])
def kernels(request):
    """Every test twice: the fast path with the C kernels (kernels/cpu) on one torch thread, where every kernel
    serves (the products' kernel is single-threaded and steps aside for threaded oneDNN otherwise), and on torch
    alone, the path machines without a C compiler take."""
    previous = cpu_kernels.set_enabled(request.param == "c-kernels")
    with torch_threads(1 if request.param == "c-kernels" else torch.get_num_threads()):
        yield request.param
    cpu_kernels.set_enabled(previous)


def _prefill(model, ids, placements):
    states = [model.new_state(p) for p in placements]
    for row, state in enumerate(states):
        model(ids[row : row + 1], states=[state])
    return states


@pytest.mark.parametrize("prompt_len", [3, 14])  # SWA: the ring fills during decoding (masked, then not) or before
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fast_decode_equals_reference_decode(model, placement: str, prompt_len: int) -> None:
    _decode_both_ways(model, placement, prompt_len)


@pytest.mark.parametrize("placement", ["all-gdn", "all-kda", "all-swa"])
def test_fast_decode_of_own_projections(tiny_teacher, placement: str) -> None:
    """``full`` mode: every mixer owns its q/k/v/o (no teacher projections, no LoRA, no KV tiling)."""
    from supernet.convert import build_from_teacher

    _decode_both_ways(perturbed(build_from_teacher(tiny_teacher, mixer_weights="full", window=8, sinks=2), 5),
                      placement, 5)


def _decode_both_ways(model, placement: str, prompt_len: int) -> None:
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, model.config.vocab_size, (3, prompt_len), generator=gen)
    steps = torch.randint(0, model.config.vocab_size, (3, 12), generator=gen)
    with torch.no_grad():
        fast = _prefill(model, ids, [placement] * 3)
        ref = [s.clone() for s in fast]
        for i in range(steps.shape[1]):  # runs past the SWA window (8 + 2 sinks)
            got = model(steps[:, i : i + 1], states=fast).logits
            with reference_path():
                want = model(steps[:, i : i + 1], states=ref).logits
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    for a, b in zip(fast, ref, strict=True):
        assert a.length == b.length
        for la, lb in zip(a.layers, b.layers, strict=True):
            if hasattr(la, "recurrent"):  # GDN/KDA states advanced in place equal the reference's
                torch.testing.assert_close(la.recurrent, lb.recurrent, atol=2e-5, rtol=0)
                torch.testing.assert_close(la.conv, lb.conv, atol=2e-5, rtol=0)
            else:  # FA/SWA caches hold the same keys (rotated), values and, in SWA rings, positions per slot
                filled = slice(None)
                if isinstance(la, KVCache):
                    assert la.length == lb.length
                    filled = slice(0, la.length)  # slots past the length are uninitialised spare capacity
                else:
                    assert torch.equal(la.pos, lb.pos)
                torch.testing.assert_close(la.k[:, filled], lb.k[:, filled], atol=1e-5, rtol=0)
                torch.testing.assert_close(la.v[:, filled], lb.v[:, filled], atol=1e-5, rtol=0)


def test_changing_batches_and_clones_stay_exact(model) -> None:
    """Rows leave and join between steps, a state is forked mid-decode: every row still matches the reference,
    and a fork is never written by later steps of the state it was cloned from."""
    placements = ["all-gdn", "gdn,kda,fa,swa", "all-kda"]
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=gen)
    tok = torch.randint(0, model.config.vocab_size, (4, 8), generator=gen)
    with torch.no_grad():
        fast = _prefill(model, ids, placements)
        ref = [s.clone() for s in fast]

        def step(rows: list[int], i: int) -> None:
            t = tok[rows, i : i + 1]
            got = model(t, states=[fast[r] for r in rows]).logits
            with reference_path():
                want = model(t, states=[ref[r] for r in rows]).logits
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0)

        step([0, 1, 2], 0)
        step([0, 1, 2], 1)
        fast.append(fast[0].clone())  # row 3: a fork of row 0 (as n > 1 samples or a snapshot make)
        ref.append(ref[0].clone())
        frozen = [layer.recurrent.clone() for layer in fast[3].layers if hasattr(layer, "recurrent")]
        step([0, 2], 2)  # row 1 left
        step([0, 2], 3)
        after = [layer.recurrent for layer in fast[3].layers if hasattr(layer, "recurrent")]
        assert all(torch.equal(a, b) for a, b in zip(frozen, after, strict=True))
        step([0, 2, 1], 4)  # row 1 back, in another order
        step([3, 0, 1, 2], 5)  # the fork joins
        step([3, 0, 1, 2], 6)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_inference_mode_prefill_and_scoring_equal_the_reference(model, placement: str) -> None:
    """Under inference mode prompt-sized products take the packed weights too (kernels/linear.py), and GDN/KDA
    read x through their decode projection: whole-sequence logits and a chunked prefill's states equal the
    reference path's to fp32 rounding."""
    _prefill_and_score_both_ways(model, placement)


@pytest.mark.parametrize("placement", ["all-gdn", "all-kda"])
def test_inference_mode_prefill_of_own_projections(tiny_teacher, placement: str) -> None:
    from supernet.convert import build_from_teacher

    _prefill_and_score_both_ways(perturbed(build_from_teacher(tiny_teacher, mixer_weights="full"), 6), placement)


def _prefill_and_score_both_ways(model, placement: str) -> None:
    gen = torch.Generator().manual_seed(13)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=gen)
    with torch.inference_mode():
        got = model(ids, placement).logits
        fast = model.new_state(placement)
        for start in range(0, 40, 16):
            fast_logits = model(ids[:1, start : start + 16], states=[fast]).logits
        with reference_path():
            want = model(ids, placement).logits
            ref = model.new_state(placement)
            for start in range(0, 40, 16):
                ref_logits = model(ids[:1, start : start + 16], states=[ref]).logits
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)
    torch.testing.assert_close(fast_logits, ref_logits, atol=5e-5, rtol=0)
    for la, lb in zip(fast.layers, ref.layers, strict=True):
        if isinstance(la, KVCache):  # beyond ``length`` the buffers are unwritten capacity
            la = KVCache(la.k[:, : la.length], la.v[:, : la.length])
            lb = KVCache(lb.k[:, : lb.length], lb.v[:, : lb.length])
        for name in ("recurrent", "conv", "k", "v"):
            if hasattr(la, name):
                torch.testing.assert_close(getattr(la, name), getattr(lb, name), atol=5e-5, rtol=0)
