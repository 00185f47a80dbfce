"""The supernet as a vLLM plugin model (entry point ``vllm.general_plugins`` -> ``serving.vllm:register``).

``register()`` runs in every vLLM process before an engine is built. It makes vLLM understand our checkpoints
(``config.json`` with model_type ``hybrid_supernet``) and run them as ``HybridSupernetForCausalLM`` with
per-request presets (``vllm_xargs: {"preset": ...}``). See docs/vllm.md.
"""

from __future__ import annotations

ARCHITECTURE = "HybridSupernetForCausalLM"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from serving.vllm.config import HybridSupernetHFConfig, SupernetVllmConfig
    from supernet.config import MODEL_TYPE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "serving.vllm.model:HybridSupernetForCausalLM")
    _CONFIG_REGISTRY[MODEL_TYPE] = HybridSupernetHFConfig
    try:
        AutoConfig.register(MODEL_TYPE, HybridSupernetHFConfig)
    except ValueError:
        pass  # already registered in this process
    MODELS_CONFIG_MAP[ARCHITECTURE] = SupernetVllmConfig
