"""Teacher -> supernet: FA is the teacher's attention exactly; SWA/GDN/KDA start from it by transfer.

The trunk (embeddings, norms, MLPs, LM head) is copied and stays frozen. In ``lora`` mode each layer keeps the
teacher's q/k/v/o once and the other mixers start as adapters on it with zero deltas; in ``full`` mode every mixer
gets its own copy (KV heads tiled for GDN/KDA). Mixer-specific init (identity conv, neutral gate, fast decay) is
the mixers' own (see mixers/delta.py).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from supernet.config import AttentionConfig, DeltaConfig, SupernetConfig
from supernet.layers import AttentionProjections, repeat_heads
from supernet.model import DecoderLayer, SupernetForCausalLM

DEFAULT_WINDOW = 512
DEFAULT_SINKS = 4


def config_from_teacher(
    teacher_config: Any,
    *,
    mixer_weights: str = "lora",
    lora_rank: int = 16,
    window: int = DEFAULT_WINDOW,
    sinks: int = DEFAULT_SINKS,
    gate_rank: int | None = None,
    base_model: str | None = None,
) -> SupernetConfig:
    """Map a transformers Llama/Mistral/Qwen2 config onto ours."""
    tc = teacher_config
    heads, kv_heads = tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    bias = bool(getattr(tc, "attention_bias", False)) or tc.model_type == "qwen2"
    # FA must be the teacher's attention exactly, so a teacher that itself attends through a window cannot convert.
    # Qwen2 says so with use_sliding_window; Mistral uses sliding_window whenever it is set.
    teacher_window = getattr(tc, "sliding_window", None)
    windowed = getattr(tc, "use_sliding_window", tc.model_type == "mistral")
    if windowed and teacher_window and teacher_window < tc.max_position_embeddings:
        raise ValueError(f"teacher uses sliding_window={teacher_window}; only full-attention teachers convert")
    rope = dict(
        getattr(tc, "rope_parameters", None)
        or {"rope_type": "default", "rope_theta": getattr(tc, "rope_theta", 10000.0)}
    )
    delta = {"num_heads": heads, "head_dim": head_dim, "gate_rank": gate_rank or head_dim}
    return SupernetConfig(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers,
        fa=AttentionConfig(heads, kv_heads, head_dim, bias),
        swa=AttentionConfig(heads, kv_heads, head_dim, bias, window=window, sinks=sinks),
        gdn=DeltaConfig(**delta),
        kda=DeltaConfig(**delta),
        rms_norm_eps=tc.rms_norm_eps,
        hidden_act=tc.hidden_act,
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        tie_word_embeddings=bool(tc.tie_word_embeddings),
        max_position_embeddings=tc.max_position_embeddings,
        rope_parameters=rope,
        mixer_weights=mixer_weights,
        lora_rank=lora_rank,
        bos_token_id=tc.bos_token_id,
        eos_token_id=tc.eos_token_id,
        pad_token_id=getattr(tc, "pad_token_id", None),
        base_model=base_model,
        teacher_model_type=tc.model_type,
    )


@torch.no_grad()
def _copy_projections(dst: AttentionProjections, src: Any, head_dim: int, kv_repeat: int) -> None:
    dst.q_proj.load_state_dict(src.q_proj.state_dict())
    dst.o_proj.weight.copy_(src.o_proj.weight)
    for name in ("k_proj", "v_proj"):
        s, d = getattr(src, name), getattr(dst, name)
        d.weight.copy_(repeat_heads(s.weight.T, head_dim, kv_repeat).T)
        if s.bias is not None:
            d.bias.copy_(repeat_heads(s.bias, head_dim, kv_repeat))


@torch.no_grad()
def load_trunk_from_teacher(model: SupernetForCausalLM, teacher: Any) -> None:
    """Copy everything the teacher has (trunk + attention projections) into a supernet built from its config.
    ``teacher`` is any Llama-layout transformers causal LM (``.model.layers[i].self_attn.q_proj``, ...)."""
    cfg = model.config
    body = teacher.model
    model.embed_tokens.weight.copy_(body.embed_tokens.weight)
    model.norm.weight.copy_(body.norm.weight)
    if model.lm_head is not None:
        model.lm_head.weight.copy_(teacher.lm_head.weight)
    kv_repeat = cfg.fa.num_heads // cfg.fa.num_kv_heads
    for layer, tl in zip(cast(list[DecoderLayer], list(model.layers)), body.layers, strict=True):
        layer.input_layernorm.weight.copy_(tl.input_layernorm.weight)
        layer.post_attention_layernorm.weight.copy_(tl.post_attention_layernorm.weight)
        layer.mlp.load_state_dict(tl.mlp.state_dict())
        if layer.attn is not None:
            layer.attn.load_state_dict(tl.self_attn.state_dict())
        else:
            for name, mixer in layer.mixers.items():
                repeat = kv_repeat if name in ("gdn", "kda") else 1
                projections: Any = mixer.proj  # a MixerProjections (ModuleDict values are typed as Module)
                _copy_projections(projections.own, tl.self_attn, cfg.fa.head_dim, repeat)


def build_from_teacher(
    teacher: nn.Module, base_model: str | None = None, **options: Any
) -> SupernetForCausalLM:
    """A supernet at transfer init from a loaded transformers teacher; ``options`` go to config_from_teacher."""
    config = config_from_teacher(teacher.config, base_model=base_model, **options)
    model = SupernetForCausalLM(config)
    load_trunk_from_teacher(model, teacher)
    return model.eval()
