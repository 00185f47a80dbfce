"""Apriel2 (Super Apriel) checkpoints import exactly: a tiny one is written here from the documented layout
(config ``decoder`` blocks with a stochastic mixer; ``model.decoder.blocks.<i>.mixer.mixers.<name>.*`` weights),
imported, and checked against Apriel2's own math written out below. Needs no vLLM."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.conftest import make_tiny_llama

HEADS, KEY_HEADS, DIM, HIDDEN = 2, 1, 32, 64


def apriel2_config(num_blocks: int = 2, pattern: bool = False) -> dict:
    attention = {
        "type": "attention", "heads": HEADS, "head_groups": 1, "head_size": DIM, "add_linear_biases": False,
        "rotary": {"type": "default", "theta": 10000.0},
    }  # fmt: skip
    mixers = {
        "attention": attention,
        "sliding_window": {**attention, "window_size": 8},
        "gdn": {
            "type": "gdn", "value_heads": HEADS, "key_heads": KEY_HEADS, "key_head_dim": DIM, "value_head_dim": DIM,
            "convolution_layer": {"kernel_size": 4}, "norm_eps": 1e-5,
        },
        "kda": {
            "type": "kda", "heads": HEADS, "head_dim": DIM, "convolution_layer": {"kernel_size": 4},
            "normalization": {"epsilon": 1e-5, "activation": "sigmoid"},
        },
    }  # fmt: skip
    block = {
        "mlp": {"type": "mlp", "intermediate_size": 128, "activation": "silu", "gated": True},
        "normalization": {"type": "rms_norm", "epsilon": 1e-6},
    }
    if pattern:
        decoder = {
            "type": "pattern", "num_blocks": num_blocks, "pattern": ["attn", "gdn"],
            "blocks": {"attn": {**block, "mixer": attention}, "gdn": {**block, "mixer": mixers["gdn"]}},
        }  # fmt: skip
    else:
        decoder = {
            "type": "fixed", "num_blocks": num_blocks,
            "block": {**block, "mixer": {"type": "stochastic", "main_mixer_name": "attention", "mixers": mixers}},
        }  # fmt: skip
    return {
        "model_type": "apriel2", "architectures": ["Apriel2ForCausalLM"], "vocab_size": 384, "hidden_size": HIDDEN,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
        "head": {"normalization": {"type": "rms_norm", "epsilon": 1e-6}}, "decoder": decoder,
    }  # fmt: skip


def apriel2_weights(llama, pattern: bool = False) -> dict[str, torch.Tensor]:
    """Trunk and attention from a Llama (Apriel2's transfer init), everything else random."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    sd = llama.state_dict()
    w = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
         "lm_head.weight": sd["lm_head.weight"]}  # fmt: skip
    kd, vd = KEY_HEADS * DIM, HEADS * DIM
    for i in range(llama.config.num_hidden_layers):
        b, t = f"model.decoder.blocks.{i}.", f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            w[f"{b}{n}.weight"] = sd[f"{t}{n}.weight"]
        for n in ("gate_proj", "up_proj", "down_proj"):
            w[f"{b}mlp.{n}.weight"] = sd[f"{t}mlp.{n}.weight"]
        attn = {f"{n}.weight": sd[f"{t}self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        gdn = {
            "in_proj_qkvz.weight": rnd(2 * kd + 2 * vd, HIDDEN), "in_proj_ba.weight": rnd(2 * HEADS, HIDDEN),
            "out_proj.weight": rnd(HIDDEN, vd), "convolution.weight": rnd(2 * kd + vd, 1, 4, scale=0.5),
            "dt_bias": torch.ones(HEADS), "A_log": torch.rand(HEADS, generator=g).add(0.5).log(),
            "norm.weight": 1 + rnd(DIM),
        }  # fmt: skip
        kda = {f"{n}.weight": rnd(vd, HIDDEN) for n in ("q_proj", "k_proj", "v_proj")}
        kda |= {f"{c}_conv.weight": rnd(vd, 1, 4, scale=0.5) for c in "qkv"}
        kda |= {
            "f_a_proj.weight": rnd(DIM, HIDDEN), "f_b_proj.weight": rnd(vd, DIM), "g_a_proj.weight": rnd(DIM, HIDDEN),
            "g_b_proj.weight": rnd(vd, DIM), "beta_proj.weight": rnd(HEADS, HIDDEN), "o_proj.weight": rnd(HIDDEN, vd),
            "A_log": torch.rand(HEADS, generator=g).add(0.5).log(), "dt_bias": torch.ones(vd),
            "norm.weight": 1 + rnd(DIM),
        }  # fmt: skip
        if pattern:
            mixer = attn if i % 2 == 0 else gdn
            w |= {f"{b}mixer.{k}": v for k, v in mixer.items()}
            continue
        for name, mixer in (("attention", attn), ("sliding_window", attn), ("gdn", gdn), ("kda", kda)):
            w |= {f"{b}mixer.mixers.{name}.{k}": v for k, v in mixer.items()}
    return w


@pytest.fixture(scope="module")
def llama():
    return make_tiny_llama(
        layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=1, head_dim=DIM,
        rms_norm_eps=1e-6,
    )


def write_apriel2(path, llama, pattern=False):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(apriel2_config(pattern=pattern)))
    weights = apriel2_weights(llama, pattern)
    save_file({k: v.clone().contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return weights


@pytest.fixture(scope="module")
def imported(llama, tmp_path_factory):
    from supernet.apriel2 import import_apriel2
    from supernet.checkpoint import load_supernet

    root = tmp_path_factory.mktemp("apriel2")
    weights = write_apriel2(root / "src", llama)
    import_apriel2(root / "src", root / "ours")
    return load_supernet(root / "ours"), weights


def causal_conv_silu(x, w):  # x [T, C], w [C, K]: PyTorch Conv1d padded K-1 on the left
    return F.silu(F.conv1d(F.pad(x.T, (w.shape[1] - 1, 0))[None], w[:, None], groups=x.shape[1])[0].T)


def delta_rule(q, k, v, g, beta):  # [T, H, D] each, g [T, H, D or 1] (log-decay), beta [T, H]
    q, k = F.normalize(q, dim=-1, eps=1e-6) * DIM**-0.5, F.normalize(k, dim=-1, eps=1e-6)
    state, out = torch.zeros(q.shape[1], DIM, DIM), []
    for t in range(q.shape[0]):
        state = state * g[t].exp()[..., None]
        u = beta[t][:, None] * (v[t] - torch.einsum("hk,hkv->hv", k[t], state))
        state = state + torch.einsum("hk,hv->hkv", k[t], u)
        out.append(torch.einsum("hk,hkv->hv", q[t], state))
    return torch.stack(out)


def gated_norm(o, w, gate, eps=1e-5):
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * w * gate


def apriel2_gdn(x, w, p):
    T, kd, vd, rep = x.shape[0], KEY_HEADS * DIM, HEADS * DIM, HEADS // KEY_HEADS
    q, k, v, z = (x @ w[p + "in_proj_qkvz.weight"].T).split([kd, kd, vd, vd], -1)
    beta, alpha = (x @ w[p + "in_proj_ba.weight"].T).split([HEADS, HEADS], -1)
    q, k, v = causal_conv_silu(torch.cat([q, k, v], -1), w[p + "convolution.weight"][:, 0]).split([kd, kd, vd], -1)
    q = q.view(T, KEY_HEADS, DIM).repeat_interleave(rep, 1)
    k = k.view(T, KEY_HEADS, DIM).repeat_interleave(rep, 1)
    g = -w[p + "A_log"].exp() * F.softplus(alpha + w[p + "dt_bias"])
    o = delta_rule(q, k, v.view(T, HEADS, DIM), g[..., None], beta.sigmoid())
    o = gated_norm(o, w[p + "norm.weight"], F.silu(z.view(T, HEADS, DIM)))
    return o.reshape(T, -1) @ w[p + "out_proj.weight"].T


def apriel2_kda(x, w, p):
    T = x.shape[0]
    q, k, v = (causal_conv_silu(x @ w[f"{p}{c}_proj.weight"].T, w[f"{p}{c}_conv.weight"][:, 0]) for c in "qkv")
    f = (x @ w[p + "f_a_proj.weight"].T @ w[p + "f_b_proj.weight"].T).view(T, HEADS, DIM)
    g = -w[p + "A_log"].exp()[:, None] * F.softplus(f + w[p + "dt_bias"].view(HEADS, DIM))
    beta = (x @ w[p + "beta_proj.weight"].T).sigmoid()
    o = delta_rule(q.view(T, HEADS, DIM), k.view(T, HEADS, DIM), v.view(T, HEADS, DIM), g, beta)
    gate = (x @ w[p + "g_a_proj.weight"].T @ w[p + "g_b_proj.weight"].T).view(T, HEADS, DIM).sigmoid()
    return gated_norm(o, w[p + "norm.weight"], gate).reshape(T, -1) @ w[p + "o_proj.weight"].T


@pytest.mark.parametrize("mixer", ["gdn", "kda"])
def test_imported_linear_mixers_compute_apriel2s_math(imported, mixer):
    from supernet.mixers import MixerContext

    model, weights = imported
    x = torch.randn(20, HIDDEN, generator=torch.Generator().manual_seed(2))
    ctx = MixerContext(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1), torch.zeros(1))
    with torch.no_grad():
        ours = model.layers[1].mixers[mixer](x[None], None, ctx, None)[0]
    reference = (apriel2_gdn if mixer == "gdn" else apriel2_kda)(
        x, weights, f"model.decoder.blocks.1.mixer.mixers.{mixer}."
    )
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_imported_supernet_generates_and_attention_is_the_llamas(imported, llama):
    from supernet.generate import greedy_generate

    model, _ = imported
    prompt = [5, 9, 31, 7, 100, 42, 3, 8, 15, 16, 23]
    outputs = {p: greedy_generate(model, prompt, p, 8) for p in ("all-fa", "all-swa", "all-gdn", "all-kda")}
    assert all(len(o) == 8 for o in outputs.values()) and len({tuple(o) for o in outputs.values()}) == 4
    with torch.no_grad():
        hf = llama.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert outputs["all-fa"] == hf[0, len(prompt) :].tolist()


def test_pattern_decoder_imports_as_a_thin_checkpoint(llama, tmp_path):
    from supernet.apriel2 import import_apriel2
    from supernet.presets import read_presets

    write_apriel2(tmp_path / "src", llama, pattern=True)
    out = import_apriel2(tmp_path / "src", tmp_path / "ours")
    assert [p.placement for p in read_presets(out / "presets.yaml").presets] == ["fa,gdn"]


def test_cli_names_what_it_cannot_import(tmp_path):
    from typer.testing import CliRunner

    from supernet.cli import app

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({**apriel2_config(), "model_type": "llama"}))
    result = CliRunner().invoke(app, ["import-apriel2", "--from", str(tmp_path / "src"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "model_type='llama'" in result.output
