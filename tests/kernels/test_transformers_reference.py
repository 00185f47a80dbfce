"""Agreement with the independent torch references that ship inside transformers (Qwen3-Next, Kimi-Linear).

Those functions take the same ``[B, T, H, D]`` layout and apply ``K ** -0.5`` to q themselves (we pass our
default scale), and L2-normalise only when asked (we pass already-normalised q/k and leave it off). When
flash-linear-attention is importable, transformers swaps them for fla's Triton kernels, which cannot run on a
CPU, so the comparison is skipped there.
"""

from __future__ import annotations

import importlib.util

import pytest

from kernels import chunk_gated_delta_rule, chunk_kda, recurrent_gated_delta_rule, recurrent_kda
from tests.kernels.helpers import delta_inputs, fp32_tol, max_err

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fla") is not None,
    reason="flash-linear-attention is installed: transformers routes its references to Triton kernels",
)


@pytest.fixture(scope="module")
def qwen():
    mod = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    return mod.torch_chunk_gated_delta_rule, mod.torch_recurrent_gated_delta_rule


@pytest.fixture(scope="module")
def kimi():
    mod = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    return mod.chunk_kimi_delta_attention, mod.recurrent_kimi_delta_attention


def assert_both_forms_match(rule: str, ours, references, T: int, with_state: bool) -> None:
    """Our chunked and recurrent forms each against both of the reference's forms (chunked, recurrent)."""
    x = delta_inputs(rule, B=2, T=T, H=3, K=32, V=16, initial_state=with_state, seed=T)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    refs = [ref(*args, initial_state=x["initial_state"], output_final_state=True) for ref in references]
    for fn in ours:
        o, s = fn(**x, output_final_state=True)
        for o_ref, s_ref in refs:
            assert max_err(o, o_ref) <= fp32_tol(o_ref), fn.__name__
            assert max_err(s, s_ref) <= fp32_tol(s_ref), fn.__name__


@pytest.mark.parametrize("T", [1, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_gdn_matches_qwen3_next(qwen, T: int, with_state: bool) -> None:
    assert_both_forms_match("gdn", (chunk_gated_delta_rule, recurrent_gated_delta_rule), qwen, T, with_state)


@pytest.mark.parametrize("T", [1, 65, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_kda_matches_kimi_linear(kimi, T: int, with_state: bool) -> None:
    # Per-channel log-decay down to -5 per token (the helper's default), i.e. channels that forget in a token.
    assert_both_forms_match("kda", (chunk_kda, recurrent_kda), kimi, T, with_state)


def test_kda_with_gdn_shaped_decay_equals_gdn(qwen) -> None:
    """KDA with the same decay on every channel is GDN: ties the two references together."""
    ref_chunk, _ = qwen
    x = delta_inputs("gdn", B=1, T=100, H=2, K=16, V=8, initial_state=True, seed=31)
    o_ref, s_ref = ref_chunk(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
                             output_final_state=True)
    g_kda = x["g"][..., None].expand(-1, -1, -1, 16).contiguous()
    o, s = chunk_kda(**{**x, "g": g_kda}, output_final_state=True)
    assert max_err(o, o_ref) <= fp32_tol(o_ref) and max_err(s, s_ref) <= fp32_tol(s_ref)
