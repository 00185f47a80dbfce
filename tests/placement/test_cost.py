"""Cost models: analytic roofline vs the real caches, measured timing, additivity."""

from __future__ import annotations

import pytest

from placement.cost import (
    GPUS,
    CostModel,
    analytic_cost_model,
    measure_cost_model,
    parse_cost_model_name,
    state_bytes,
)
from supernet.checkpoint import load_supernet
from supernet.config import MIXER_NAMES, SupernetConfig


def test_state_bytes_match_real_caches(tiny_ckpt):
    """The analytic KV/state size equals what the model's own caches hold after `context` tokens (fp32
    here)."""
    import torch

    model = load_supernet(tiny_ckpt)
    context = 100
    expected = state_bytes(model.config, context, cache_dtype_bytes=4)
    for name in MIXER_NAMES:
        state = model.new_state(f"all-{name}")
        with torch.no_grad():
            model(torch.randint(0, 300, (1, context)), states=[state])
        per_layer = state.layers[0].nbytes()
        if name == "fa":
            assert per_layer == expected[name] == 2 * context * 2 * 16 * 4
        else:
            assert per_layer == expected[name], name


def test_analytic_model_shapes_and_speedups(tiny_ckpt):
    config = SupernetConfig.load(tiny_ckpt)
    short = analytic_cost_model(config, context=64, batch=8)
    long = analytic_cost_model(config, context=4096, batch=8)
    # FA decode grows with context; SWA stops growing past its window; the delta rules never grow
    assert long.mixer["fa"] > short.mixer["fa"]
    assert long.mixer["swa"] == analytic_cost_model(config, context=1024, batch=8).mixer["swa"]
    assert long.mixer["gdn"] == short.mixer["gdn"] and long.kv_bytes["kda"] == short.kv_bytes["kda"]
    p = ("fa", "gdn", "swa", "kda")
    assert long.cost(p) == pytest.approx(long.shared + sum(long.mixer[m] for m in p))
    assert long.speedup(("fa",) * 4) == 1.0 and long.speedup(("gdn",) * 4) > long.speedup(p) > 1.0
    assert long.kv_bytes_per_seq(("fa",) * 4) == 4 * 2 * 4096 * 2 * 16 * 2  # bf16 K and V, 2 KV heads x 16
    assert "3.35 TB/s" in long.device and long.model == "analytic:h100-sxm"
    assert CostModel.from_dict(long.to_dict()) == long
    assert analytic_cost_model(config, 4096, 8, "h200").mixer["fa"] < long.mixer["fa"]  # more bandwidth
    with pytest.raises(ValueError, match="unknown GPU 'tpu'"):
        parse_cost_model_name("analytic:tpu")
    assert parse_cost_model_name("analytic") == ("analytic", "h100-sxm") and "h100-sxm" in GPUS


def test_measured_cost_model(tiny_ckpt):
    model = load_supernet(tiny_ckpt)
    cm = measure_cost_model(model, context=2048, batch=2, repeats=3, prefill_context=64)
    assert cm.model == "measured" and set(cm.mixer) == set(MIXER_NAMES)
    assert all(v > 0 for v in cm.mixer.values()) and cm.shared > 0 and all(v > 0 for v in cm.prefill.values())
    assert cm.kv_bytes == state_bytes(model.config, 2048, 4)
    assert cm.speedup(("fa",) * 4) == 1.0 and cm.prefill_speedup(("fa",) * 4) == 1.0
