"""Conversion: the all-FA placement of a converted model is the teacher."""

from __future__ import annotations

import pytest
import torch

from supernet.convert import build_from_teacher
from tests.conftest import make_tiny_llama


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_all_fa_reproduces_teacher_logits(tie: bool, mode: str) -> None:
    teacher = make_tiny_llama(tie=tie, seed=1)
    model = build_from_teacher(teacher, mixer_weights=mode, window=8)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids, "all-fa").logits - teacher(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_transfer_init_swa_is_exact_and_linear_mixers_run(tiny_teacher) -> None:
    """Transfer init: SWA (zero LoRA deltas) is exactly FA within its window; GDN/KDA run and stay finite."""
    model = build_from_teacher(tiny_teacher, window=64)
    ids = torch.randint(
        0, tiny_teacher.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        ref = tiny_teacher(ids).logits
        assert (model(ids, "all-swa").logits - ref).abs().max() <= 1e-4
        for placement in ("all-gdn", "all-kda"):
            assert torch.isfinite(model(ids, placement).logits).all(), placement


def test_full_mode_tiles_kv_heads_for_delta_mixers(tiny_teacher) -> None:
    model = build_from_teacher(tiny_teacher, mixer_weights="full")
    src = tiny_teacher.model.layers[0].self_attn.k_proj.weight  # [Hkv*D, hidden]
    tiled = model.layers[0].mixers["gdn"].proj.own.k_proj.weight  # [H*D, hidden]
    d = model.config.fa.head_dim
    assert torch.equal(tiled[:d], src[:d]) and torch.equal(tiled[d : 2 * d], src[:d])
    assert torch.equal(tiled[2 * d : 3 * d], src[d : 2 * d])


@pytest.mark.smollm2
def test_smollm2_all_fa_matches_teacher() -> None:
    from supernet.teacher import load_teacher

    teacher, tokenizer = load_teacher("smollm2")
    model = build_from_teacher(teacher)
    ids = tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (model(ids, "all-fa").logits - teacher(ids).logits).abs().max().item()
    assert diff <= 1e-4
