"""``HybridSupernetForCausalLM``: the supernet as a vLLM model (registered by serving.vllm.register).

The weights live in our own ``SupernetForCausalLM`` modules (``self.net``), so names, shapes and math are
exactly the embedded engine's; mixers that no served preset uses are dropped before loading (a thin export
holds only the ones its presets use). Token mixing runs through one ``SupernetMixer`` per layer
(serving.vllm.layers), everything else (embeddings, norms, MLP, head) is the shared trunk run as-is.

Tensor parallelism: not supported (size 1 only; the projections are plain ``nn.Linear``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from vllm.config import VllmConfig

from serving.vllm.config import plugin_options, served_layer_mixers, served_presets
from serving.vllm.layers import SupernetMixer
from serving.vllm.router import ROUTING
from serving.vllm.weights import load_supernet_weights
from supernet.config import MIXER_NAMES
from supernet.model import SupernetForCausalLM


class HybridSupernetForCausalLM(nn.Module):
    # vLLM's hybrid path: attention caches and mamba-style state caches side by side.
    is_hybrid: ClassVar[Literal[True]] = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        model_config = vllm_config.model_config
        config = model_config.hf_config.supernet_config()
        self.config = config
        self.model_dir = model_config.model
        num_layers = config.num_hidden_layers
        self.presets = served_presets(self.model_dir, num_layers, plugin_options(vllm_config))
        ROUTING.configure(self.presets)
        self.net = SupernetForCausalLM(config)
        self.layer_mixers = served_layer_mixers(self.presets, num_layers)
        self.decoder_layers = [self.net.layer(i) for i in range(num_layers)]  # typed views, not submodules
        for layer, keep in zip(self.decoder_layers, self.layer_mixers, strict=True):
            for name in MIXER_NAMES:
                if name not in keep:
                    del layer.mixers[name]
        root = f"{prefix}." if prefix else ""
        self.mixers = nn.ModuleList(
            SupernetMixer(layer, self.net.rotary, i, num_layers, keep, root, vllm_config.cache_config)
            for i, (layer, keep) in enumerate(zip(self.decoder_layers, self.layer_mixers, strict=True))
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        """The larger of GDN's and KDA's state layout (they match for converted models): conv tail
        [3 * heads * head_dim, kernel - 1] and recurrent state [heads, head_dim, head_dim]."""
        config = vllm_config.model_config.hf_config.supernet_config()
        shapes = [
            ((3 * d.num_heads * d.head_dim, d.conv_kernel - 1), (d.num_heads, d.head_dim, d.head_dim))
            for d in (config.gdn, config.kda)
        ]
        return max(shapes, key=lambda s: s[0][0] * s[0][1] + s[1][0] * s[1][1] * s[1][2])

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return (vllm_config.model_config.dtype, torch.float32)  # the recurrent state is always fp32

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.net.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors=None,
        inputs_embeds: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_input_ids(input_ids)
        x = inputs_embeds
        for layer, mixer in zip(self.decoder_layers, self.mixers, strict=True):
            x = x + mixer(layer.input_layernorm(x), positions)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.net.norm(x)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        head = self.net.lm_head.weight if self.net.lm_head is not None else self.net.embed_tokens.weight
        return hidden_states @ head.T

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        load_supernet_weights(self.net, self.model_dir, self.layer_mixers)
        return {name for name, _ in self.named_parameters()}
