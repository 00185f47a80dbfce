"""``supernet import-apriel2``: Apriel2 checkpoints (the released Super Apriel layout) into our format.

Apriel2 (``model_type: apriel2``) describes its decoder as blocks: ``decoder: {type: fixed, num_blocks, block:
{mixer, mlp, normalization}}`` or ``{type: pattern, blocks: {name: block}, pattern: [name, ...]}``; a supernet
block's mixer is ``{type: stochastic, main_mixer_name, mixers: {name: mixer}}``. Mixer types map onto ours:
``attention`` without ``window_size`` -> FA, with it -> SWA (no sinks: Apriel2's window has none), ``gdn`` -> GDN,
``kda`` -> KDA. Weights (``model.decoder.blocks.<i>.mixer[.mixers.<name>].*``) map exactly, as a ``full``
supernet (every mixer owns its projections):

* GDN's flat ``in_proj_qkvz`` = [Q | K | V | Z] and ``in_proj_ba`` = [beta | alpha]; its key heads may be fewer
  than its value heads (each serves a group of value heads): q/k rows and their conv channels are tiled to one
  key head per value head, which is exactly what the grouped recurrence computes. The full-rank output gate Z
  becomes our low-rank gate with rank = hidden size (identity down-projection).
* KDA's separate q/k/v convolutions are concatenated; ``f_a/f_b`` and ``g_a/g_b`` are our low-rank decay and
  gate (rank = head dim); KDA's gated norm must use sigmoid (Kimi's), the one ours implements.

A fixed decoder imports as a full supernet; a pattern decoder (one placement) imports as a thin checkpoint
(supernet.export) holding the placement's mixers, with that placement as its only preset. Anything we cannot
represent exactly (biases on the output projection, other rope types, unequal head sizes) is refused by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any, cast

import torch
import typer
from torch import Tensor

TYPES = {"gdn": "gdn", "kda": "kda"}


class Apriel2Error(ValueError):
    """An Apriel2 checkpoint we cannot represent exactly; the message names the field."""


def _layer_mixers(decoder: dict[str, Any]) -> list[dict[str, tuple[str, dict]]]:
    """Per layer: our mixer name -> (Apriel2 weight prefix under the block's mixer, mixer config); the block's
    main mixer (``main_mixer_name``, else its only or first one) comes first."""
    kind, n = decoder.get("type", "fixed"), cast(int, decoder.get("num_blocks"))  # Apriel2 always sets it
    if kind == "fixed":
        blocks = [decoder["block"]] * n
    elif kind == "pattern":
        pattern = decoder["pattern"]
        blocks = [decoder["blocks"][pattern[i % len(pattern)]] for i in range(n)]
    else:
        raise Apriel2Error(f"decoder.type {kind!r}: expected 'fixed' or 'pattern'")
    out = []
    for i, block in enumerate(blocks):
        mixer = block["mixer"]
        if mixer.get("type") == "stochastic":
            main = mixer.get("main_mixer_name", next(iter(mixer["mixers"])))
            entries = sorted(mixer["mixers"].items(), key=lambda item: item[0] != main)
        else:
            entries = [(None, mixer)]
        layer: dict[str, tuple[str, dict]] = {}
        for name, cfg in entries:
            kind = cfg.get("type", "attention")
            ours = ("swa" if cfg.get("window_size") else "fa") if kind == "attention" else TYPES.get(kind)
            if ours is None:
                raise Apriel2Error(f"layer {i}: mixer type {kind!r} has no counterpart (fa, swa, gdn, kda)")
            if ours in layer:
                raise Apriel2Error(f"layer {i}: two mixers map to {ours!r}")
            layer[ours] = ("mixer." if name is None else f"mixer.mixers.{name}.", cfg)
        out.append(layer)
    return out


def _bias(cfg: dict, layer: str) -> bool:
    enabled = cfg.get(layer, {}).get("bias", {}).get("enabled")
    return bool(cfg.get("add_linear_biases", False) if enabled is None else enabled)


def config_from_apriel2(data: dict[str, Any]):
    """Our SupernetConfig for an Apriel2 config.json, plus the per-layer mixer map."""
    from supernet.config import AttentionConfig, DeltaConfig, SupernetConfig

    if data.get("model_type") != "apriel2":
        raise Apriel2Error(f"config.model_type={data.get('model_type')!r}; expected 'apriel2'")
    layers = _layer_mixers(data["decoder"])
    found = {name: cfg for layer in layers for name, (_, cfg) in layer.items()}
    attn = found.get("fa") or found.get("swa")
    if attn is None:
        raise Apriel2Error("no attention mixer: the head layout comes from it")
    heads, kv, dim = attn["heads"], attn.get("head_groups", attn["heads"]), attn["head_size"]
    bias = _bias(attn, "query_layer")
    for name in ("fa", "swa"):
        cfg = found.get(name)
        if cfg is None:
            continue
        if (cfg["heads"], cfg.get("head_groups", cfg["heads"]), cfg["head_size"]) != (heads, kv, dim):
            raise Apriel2Error(f"{name}: heads/head_groups/head_size must match the other attention mixer")
        if _bias(cfg, "dense_layer") or len({_bias(cfg, x) for x in ("query_layer", "key_layer", "value_layer")}) > 1:
            raise Apriel2Error(f"{name}: only q/k/v biases all on or all off, and no output bias, are supported")
        rotary = cfg.get("rotary", {"type": "default"})
        if rotary.get("type", "default") != "default":
            raise Apriel2Error(f"{name}: rotary type {rotary.get('type')!r}; only 'default' is supported")
    theta = float(attn.get("rotary", {}).get("theta", data.get("rope_theta", 10000.0)))
    gdn, kda = found.get("gdn", {}), found.get("kda", {})
    if gdn and (gdn.get("value_heads") != heads or {gdn.get("key_head_dim"), gdn.get("value_head_dim")} != {dim}):
        raise Apriel2Error(f"gdn: value_heads must be {heads} and key/value head dims {dim} (the attention's)")
    if kda and (kda.get("heads") != heads or kda.get("head_dim") != dim):
        raise Apriel2Error(f"kda: heads must be {heads} and head_dim {dim} (the attention's)")
    if kda and kda.get("normalization", {}).get("activation", "silu") != "sigmoid":
        raise Apriel2Error("kda: normalization.activation must be 'sigmoid' (Kimi's gated norm)")
    block = data["decoder"].get("block") or next(iter(data["decoder"]["blocks"].values()))
    mlp = block["mlp"]
    if not mlp.get("gated", False) or mlp.get("activation", "silu") != "silu" or mlp.get("add_linear_biases"):
        raise Apriel2Error("mlp: only the gated SiLU MLP without biases (Llama/Mistral) is supported")
    swa = found.get("swa", {})
    return SupernetConfig(
        vocab_size=data["vocab_size"],
        hidden_size=data["hidden_size"],
        intermediate_size=mlp["intermediate_size"],
        num_hidden_layers=len(layers),
        fa=AttentionConfig(heads, kv, dim, bias),
        swa=AttentionConfig(heads, kv, dim, bias, window=int(swa.get("window_size", 4096)), sinks=0),
        gdn=DeltaConfig(
            heads,
            dim,
            gdn.get("convolution_layer", {}).get("kernel_size", 4),
            data["hidden_size"],
            gdn.get("norm_eps", 1e-5),
        ),
        kda=DeltaConfig(
            heads,
            dim,
            kda.get("convolution_layer", {}).get("kernel_size", 4),
            dim,
            kda.get("normalization", {}).get("epsilon", 1e-5),
        ),
        rms_norm_eps=block.get("normalization", {}).get("epsilon", data.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        max_position_embeddings=data.get("max_position_embeddings", 4096),
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        mixer_weights="full",
        bos_token_id=data.get("bos_token_id"),
        eos_token_id=data.get("eos_token_id"),
        pad_token_id=data.get("pad_token_id"),
    ), layers


def _tile(w: Tensor, head_dim: int, repeats: int) -> Tensor:
    """Rows of ``repeats``-fold fewer heads -> one copy per head they serve (GQA tiling, rows in place)."""
    from supernet.layers import repeat_heads

    return repeat_heads(w.T, head_dim, repeats).T.contiguous() if w.dim() == 2 else repeat_heads(w, head_dim, repeats)


def map_weights(config, layers, src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apriel2 tensors -> our names (full mode), for the mixers each layer has."""
    hidden, dim = config.hidden_size, config.fa.head_dim
    out = {"embed_tokens.weight": src["model.embed_tokens.weight"], "norm.weight": src["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = src["lm_head.weight"]
    for i, layer in enumerate(layers):
        b, o = f"model.decoder.blocks.{i}.", f"layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            out[f"{o}{name}.weight"] = src[f"{b}{name}.weight"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"{o}mlp.{name}.weight"] = src[f"{b}mlp.{name}.weight"]
        for ours, (prefix, cfg) in layer.items():
            p, m = b + prefix, f"{o}mixers.{ours}."
            if ours in ("fa", "swa"):
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    for kind in ("weight", "bias"):
                        if f"{p}{proj}.{kind}" in src:
                            out[f"{m}proj.own.{proj}.{kind}"] = src[f"{p}{proj}.{kind}"]
            elif ours == "gdn":
                heads, key_heads = cfg["value_heads"], cfg["key_heads"]
                rep, kd, vd = heads // key_heads, key_heads * dim, heads * dim
                q, k, v, z = src[f"{p}in_proj_qkvz.weight"].split([kd, kd, vd, vd])
                beta, alpha = src[f"{p}in_proj_ba.weight"].split([heads, heads])
                cq, ck, cv = src[f"{p}convolution.weight"][:, 0].split([kd, kd, vd])
                out |= {
                    f"{m}proj.own.q_proj.weight": _tile(q, dim, rep),
                    f"{m}proj.own.k_proj.weight": _tile(k, dim, rep),
                    f"{m}proj.own.v_proj.weight": v,
                    f"{m}proj.own.o_proj.weight": src[f"{p}out_proj.weight"],
                    f"{m}conv_weight": torch.cat([_tile(cq, dim, rep), _tile(ck, dim, rep), cv]),
                    f"{m}b_proj.weight": beta,
                    f"{m}b_proj.bias": torch.zeros(heads),
                    f"{m}a_proj.weight": alpha,
                    f"{m}dt_bias": src[f"{p}dt_bias"],
                    f"{m}A_log": src[f"{p}A_log"].reshape(-1),
                    f"{m}norm_weight": src[f"{p}norm.weight"],
                    f"{m}gate.down.weight": torch.eye(hidden),
                    f"{m}gate.up.weight": z,
                    f"{m}gate.up.bias": torch.zeros(vd),
                }
            else:  # kda
                width = cfg["heads"] * dim
                out |= {
                    f"{m}proj.own.{n}.weight": src[f"{p}{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")
                }
                out |= {
                    f"{m}conv_weight": torch.cat([src[f"{p}{c}_conv.weight"][:, 0] for c in "qkv"]),
                    f"{m}f_proj.down.weight": src[f"{p}f_a_proj.weight"],
                    f"{m}f_proj.up.weight": src[f"{p}f_b_proj.weight"],
                    f"{m}gate.down.weight": src[f"{p}g_a_proj.weight"],
                    f"{m}gate.up.weight": src[f"{p}g_b_proj.weight"],
                    f"{m}gate.up.bias": torch.zeros(width),
                    f"{m}b_proj.weight": src[f"{p}beta_proj.weight"],
                    f"{m}b_proj.bias": torch.zeros(cfg["heads"]),
                    f"{m}A_log": src[f"{p}A_log"].reshape(-1),
                    f"{m}dt_bias": src[f"{p}dt_bias"].reshape(-1),
                    f"{m}norm_weight": src[f"{p}norm.weight"],
                }
    return out


def import_apriel2(src: str | Path, out: str | Path) -> Path:
    """Convert the Apriel2 checkpoint directory ``src`` (config.json + *.safetensors) into ``out``."""
    from safetensors.torch import load_file

    from supernet.checkpoint import save_supernet
    from supernet.export import TOKENIZER_FILES, export_presets, mixer_of
    from supernet.model import SupernetForCausalLM
    from supernet.placement import format_placement

    src, out = Path(src), Path(out)
    try:
        data = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise Apriel2Error(f"{src}: cannot read config.json ({err})") from err
    try:
        config, layers = config_from_apriel2(data)
    except KeyError as err:
        raise Apriel2Error(f"{src}/config.json: missing field {err}") from err
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors |= load_file(str(file))
    if not tensors:
        raise Apriel2Error(f"{src}: no *.safetensors weights")
    try:
        mapped = map_weights(config, layers, tensors)
    except KeyError as err:
        raise Apriel2Error(f"{src}: missing tensor {err}") from err
    model = SupernetForCausalLM(config)
    own = model.state_dict()
    for key, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise Apriel2Error(f"{src}: {key} gets shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)}")
    missing = [k for k in own if k not in mapped and ((w := mixer_of(k)) is None or w[1] in layers[w[0]])]
    if missing:
        raise Apriel2Error(f"{src}: no Apriel2 tensor for {missing[:3]}")
    model.load_state_dict(mapped, strict=False)
    if all(len(layer) == 4 for layer in layers):
        save_supernet(model, out, delta=False)
    else:  # a pattern (one placement) or an incomplete supernet: a thin export of its main mixers
        staging = out.with_name(out.name + ".full")
        save_supernet(model, staging, delta=False)
        export_presets(staging, [format_placement([next(iter(layer)) for layer in layers])], out)
        shutil.rmtree(staging)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def register(app: typer.Typer) -> None:
    app.command("import-apriel2")(import_command)


def import_command(
    src: Annotated[Path, typer.Option("--from", help="Apriel2 checkpoint directory (config.json + safetensors)")],
    out: Annotated[Path, typer.Option(help="output supernet checkpoint directory")],
) -> None:
    """Convert an Apriel2 (Super Apriel) checkpoint into a supernet checkpoint."""
    try:
        path = import_apriel2(src, out)
    except Apriel2Error as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}")
