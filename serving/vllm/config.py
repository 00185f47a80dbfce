"""The supernet's config as vLLM sees it, and the engine settings the plugin enforces.

vLLM reads a transformers ``PretrainedConfig`` (head counts, layer count, vocabulary) before it builds any
model; ``HybridSupernetHFConfig`` is that view of our ``config.json`` (model_type ``hybrid_supernet``), and
``supernet_config()`` turns it back into the exact ``SupernetConfig`` our own code uses.

Which presets an engine serves decides which caches every layer registers (a layer gets a cache for every mixer
some served preset uses there), so it is fixed at engine start: ``additional_config={"supernet": {"presets":
..., "default": ...}}`` (``--additional-config`` on the command line), else ``presets.yaml`` next to the
checkpoint, else the built-in set (serving.presets).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from serving.presets import PresetError, PresetTable, load_presets, load_presets_file, table_from_specs
from supernet.config import MODEL_TYPE, SupernetConfig
from supernet.export import layer_mixers
from supernet.tensor_parallel import check_tensor_parallel

log = logging.getLogger("serving.vllm")

ARCHITECTURE = "HybridSupernetForCausalLM"
_FIELDS = {f.name for f in dataclasses.fields(SupernetConfig)}
# Fields PretrainedConfig itself also understands: passed through so both views agree.
_SHARED = ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


class HybridSupernetHFConfig(PretrainedConfig):
    """transformers/vLLM view of a supernet ``config.json``; the original fields live in ``supernet``."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS and k not in _SHARED}
        for key in _SHARED:
            if key in kwargs:
                own[key] = kwargs[key]
        kwargs.setdefault("architectures", [ARCHITECTURE])
        super().__init__(**kwargs)
        own.pop("model_type", None)
        self.supernet = own
        fa = own.get("fa") or {}
        if isinstance(fa, dict) and fa:  # the attributes vLLM's ModelConfig reads
            self.hidden_size = own["hidden_size"]
            self.num_hidden_layers = own["num_hidden_layers"]
            self.num_attention_heads = fa["num_heads"]
            self.num_key_value_heads = fa["num_kv_heads"]
            self.head_dim = fa["head_dim"]
            self.vocab_size = own["vocab_size"]
            self.intermediate_size = own["intermediate_size"]
            self.max_position_embeddings = own.get("max_position_embeddings", 4096)
            self.rms_norm_eps = own.get("rms_norm_eps", 1e-6)
            self.hidden_act = own.get("hidden_act", "silu")

    def supernet_config(self) -> SupernetConfig:
        data = {k: v for k, v in self.supernet.items() if k in _FIELDS}
        for key in _SHARED:
            data[key] = getattr(self, key, data.get(key))
        return SupernetConfig.from_dict({**data, "model_type": MODEL_TYPE})


def plugin_options(vllm_config: Any) -> dict[str, Any]:
    extra = getattr(vllm_config, "additional_config", None) or {}
    options = extra.get("supernet", {}) if isinstance(extra, dict) else {}
    if not isinstance(options, dict):
        raise ValueError(f"additional_config.supernet must be an object, got {options!r}")
    return options


def served_presets(model_dir: str | Path, num_layers: int, options: dict[str, Any] | None = None) -> PresetTable:
    """The preset table an engine serves (see the module docstring for where it comes from)."""
    options = options or {}
    spec = options.get("presets")
    if spec is None:
        table = load_presets(model_dir if Path(model_dir).is_dir() else None, num_layers)
    elif isinstance(spec, str):
        table = load_presets_file(spec, num_layers)
    elif isinstance(spec, dict):
        table = table_from_specs(spec, num_layers, source="additional_config")
    elif isinstance(spec, list):  # names of built-in-style specs, e.g. ["all-fa", "all-gdn"]
        table = table_from_specs({s: s for s in spec}, num_layers, source="additional_config")
    else:
        raise PresetError(f"additional_config.supernet.presets: expected a path, a mapping or a list, got {spec!r}")
    default = options.get("default")
    if default is not None:
        table = PresetTable(table.presets, default, table.source)
    return table


def served_layer_mixers(table: PresetTable, num_layers: int) -> list[tuple[str, ...]]:
    """Per layer, the mixers some served preset uses there: what gets a cache (and weights)."""
    return layer_mixers([p.placement for p in table.presets.values()], num_layers)


class SupernetVllmConfig(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``), run when an engine's VllmConfig is built.

    * Prefix caching is turned off: vLLM's block hashes carry no placement, so two presets would share KV
      computed under different mixers (and GDN/KDA states have no per-block snapshots here).
    * The preset router (a logits processor, serving.vllm.router) is added so requests can pick a preset, and
      its worker extension so ``collective_rpc("set_default_preset", ...)`` switches the engine-wide default.
    * A tensor-parallel size the heads cannot be split into is refused here, naming the counts
      (supernet.tensor_parallel). Speculative decoding is refused: vLLM turns custom logits processors off
      with it, and the router is one.
    """

    @classmethod
    def verify_and_update_config(cls, vllm_config: Any) -> None:
        from serving.vllm import router

        model_config = vllm_config.model_config
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        check_tensor_parallel(model_config.hf_config.supernet_config(), tp_size)
        if vllm_config.speculative_config is not None:
            raise ValueError(
                "the supernet vLLM plugin routes presets through a logits processor, which vLLM disables with "
                "speculative decoding; serve without it (the embedded engine has self-speculative decoding)"
            )
        cache = vllm_config.cache_config
        if cache.enable_prefix_caching:
            log.info("supernet: prefix caching disabled (KV must never be shared between presets)")
            cache.enable_prefix_caching = False
        procs = list(model_config.logits_processors or [])
        if router.ROUTER_FQCN not in procs and router.PresetRouter not in procs:
            procs.append(router.ROUTER_FQCN)
            model_config.logits_processors = procs
        parallel = vllm_config.parallel_config
        if not parallel.worker_extension_cls:
            parallel.worker_extension_cls = router.WORKER_EXTENSION
        hf = model_config.hf_config
        table = served_presets(model_config.model, hf.num_hidden_layers, plugin_options(vllm_config))
        router.remember_presets(table)
