"""SWA equals FA under the matching mask: banded window plus sink columns, in prefill and in bounded decode."""

from __future__ import annotations

import math

import pytest
import torch

from supernet.convert import build_from_teacher
from supernet.layers import apply_rotary
from supernet.mixers import MixerContext
from tests.conftest import make_tiny_llama


def masked_attention_reference(
    model, layer_idx: int, h: torch.Tensor, window: int, sinks: int
) -> torch.Tensor:
    """Independent reference: the teacher's attention with an explicit [T, T] mask, plain softmax, no cache."""
    cfg, layer = model.config, model.layers[layer_idx]
    attn = layer.attn
    b, t, _ = h.shape
    heads, kv, d = cfg.fa.num_heads, cfg.fa.num_kv_heads, cfg.fa.head_dim
    positions = torch.arange(t).expand(b, t)
    cos, sin = model.rotary(positions)
    q = apply_rotary(attn.q_proj(h).view(b, t, heads, d), cos, sin).transpose(1, 2)
    k = (
        apply_rotary(attn.k_proj(h).view(b, t, kv, d), cos, sin)
        .transpose(1, 2)
        .repeat_interleave(heads // kv, 1)
    )
    v = attn.v_proj(h).view(b, t, kv, d).transpose(1, 2).repeat_interleave(heads // kv, 1)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & ((i - j < window) | (j < sinks))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


# Tolerances: the SWA paths and the masked reference compute the same softmax attention over at most 30 keys and
# 16-dim heads, in a different order (ring-buffer decode, sdpa vs explicit mask). Measured here: <= 3.3e-7 on
# outputs of magnitude ~1.1, so 1e-5 leaves a 30x margin for other BLAS builds; a wrong mask or ring slot moves
# outputs by 1e-2 or more. A window covering the sequence runs FA's own code path: equal to the bit here.
@pytest.mark.parametrize("window,sinks", [(8, 0), (8, 4), (5, 2), (1, 3)])
def test_swa_prefill_and_decode_match_masked_fa(window: int, sinks: int) -> None:
    model = build_from_teacher(make_tiny_llama(seed=7), window=window, sinks=sinks)
    t = 30
    h = torch.randn(2, t, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ref = masked_attention_reference(model, 0, h, window, sinks)
    swa = model.layers[0].mixers["swa"]
    positions = torch.arange(t).expand(2, t)
    cos, sin = model.rotary(positions)
    with torch.no_grad():
        prefill = swa(h, model.layers[0].attn, MixerContext(positions, cos, sin), None)
        torch.testing.assert_close(prefill, ref, atol=1e-5, rtol=0)
        states = [swa.new_state(torch.float32, torch.device("cpu")) for _ in range(2)]
        steps = []
        for s in range(t):
            ctx = MixerContext(positions[:, s : s + 1], cos[:, s : s + 1], sin[:, s : s + 1])
            steps.append(swa(h[:, s : s + 1], model.layers[0].attn, ctx, states))
            assert states[0].k.shape[1] == window + sinks  # the cache never grows
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=0)


def test_swa_with_window_covering_the_sequence_equals_fa() -> None:
    model = build_from_teacher(make_tiny_llama(seed=8), window=64, sinks=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, "all-swa").logits, model(ids, "all-fa").logits, atol=1e-5, rtol=0
        )
        state = model.new_state("all-swa")
        model(ids[:1, :40], states=[state])
        last = model(ids[:1, 40:41], states=[state]).logits
        torch.testing.assert_close(last[0, 0], model(ids[:1, :41], "all-fa").logits[0, -1], atol=1e-5, rtol=0)
