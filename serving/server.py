"""Assembling a server: checkpoint -> model + tokenizer + presets -> engine -> FastAPI app -> uvicorn."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from serving.api import ServerSettings, create_app
from serving.async_engine import AsyncEngine
from serving.auto_preset import AutoConfig, AutoPreset, AutoPresetError, AutoPresetPolicy
from serving.engine import EngineConfig, GiB, LLMEngine
from serving.metrics import ServingMetrics
from serving.presets import PresetTable, load_presets, load_presets_file
from serving.spec_policy import spec_config_from_presets
from serving.types import ModelInfo

log = logging.getLogger("serving")


class ServeError(Exception):
    """A server that cannot start; the message says what to do (the CLI prints it)."""


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    allow_custom_placement: bool = False
    presets_file: Path | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    prefill_chunk: int = 256
    cache_budget_gib: float = 4.0
    max_queue: int = 256
    enable_prefix_caching: bool = True  # serving.prefix_cache
    threads: int | None = None
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    latency_target_ms: float | None = None  # the auto preset's target (None: AutoConfig's default)
    min_quality: float | None = None  # the auto preset's quality floor (presets.yaml's measured_quality units)
    device: str = "cpu"
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA (supernet.device.resolve_dtype)

    def auto_config(self) -> AutoConfig | None:
        """None when neither auto option is given (then auto is offered with defaults if the presets allow)."""
        if self.latency_target_ms is None and self.min_quality is None:
            return None
        target = AutoConfig.latency_target_ms if self.latency_target_ms is None else self.latency_target_ms
        return AutoConfig(latency_target_ms=target, min_quality=self.min_quality)


def default_threads() -> int:
    """Torch threads for the engine: leave one core to the HTTP thread (detokenizing, SSE) on small machines.
    On a 2-core box two OpenMP threads plus the event loop oversubscribe the cores, and OpenMP's barriers then
    stall for whole scheduler slices: measured here, 1 thread served 17x more requests than 2 under load."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else cores - 1


def default_model_name(model_dir: str | Path) -> str:
    """``supernet/demo`` -> ``supernet-demo``; any other directory -> its name."""
    path = Path(model_dir).resolve()
    return f"{path.parent.name}-{path.name}" if path.name == "demo" else path.name


def check_model_dir(model_dir: str | Path) -> None:
    import supernet

    path = Path(model_dir)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return
    hint = (
        "the demo supernet's weights are not in this checkout yet. Build a supernet (about a minute) and "
        "serve it:\n  supernet build --out DIR\n  supernet serve --model DIR"
        if path.resolve() == Path(supernet.DEMO_DIR).resolve()
        else "expected a supernet checkpoint (config.json + model.safetensors), e.g. one written by "
        "`supernet build --out DIR`"
    )
    raise ServeError(f"{path}: no supernet checkpoint here; {hint}")


def make_auto(presets: PresetTable, config: AutoConfig | None, registry: Any) -> tuple[AutoPreset | None, str]:
    """The auto preset, or None and why not. Asked for explicitly (``config`` given), a preset table that cannot
    support it is a ServeError; otherwise auto is simply not offered when the presets lack quality and speed."""
    try:
        return AutoPreset(AutoPresetPolicy.from_presets(presets, config or AutoConfig()), registry), ""
    except AutoPresetError as err:
        if config is not None:
            raise ServeError(str(err)) from None
        return None, str(err)


def build_app(
    model: Any,
    tokenizer: Any,
    *,
    model_dir: str | Path | None = None,
    served_model_name: str | None = None,
    presets: PresetTable | None = None,
    engine_config: EngineConfig | None = None,
    api_key: str | None = None,
    allow_custom_placement: bool = False,
    shutdown_timeout: float = 30.0,
    auto: AutoConfig | None = None,
) -> FastAPI:
    """A ready FastAPI app over the embedded engine (its thread starts with the app's lifespan). ``presets``:
    None reads MODEL_DIR/presets.yaml, else the built-in set; ``engine_config`` without drafts gets them from
    the presets (serving.spec_policy). ``auto``: the auto preset's settings (serving.auto_preset); None offers
    it with the defaults when the presets carry quality and speed."""
    num_layers = model.config.num_hidden_layers
    presets = presets or load_presets(model_dir, num_layers)
    config = engine_config or EngineConfig(max_model_len=model.config.max_position_embeddings)
    if config.speculative is None:  # drafts per preset for self-speculative decoding (serving.spec_policy)
        config.speculative = spec_config_from_presets(model, presets, config.max_model_len)
    name = served_model_name or (default_model_name(model_dir) if model_dir is not None else "supernet")
    info = ModelInfo(name=name, max_model_len=config.max_model_len, presets=presets, num_layers=num_layers)
    metrics = ServingMetrics()
    engine = AsyncEngine(LLMEngine(model, tokenizer, config, metrics=metrics), info)
    settings = ServerSettings(api_key, allow_custom_placement, shutdown_timeout)  # its first three fields
    settings.auto, settings.auto_unavailable = make_auto(presets, auto, metrics.registry)
    return create_app(engine, settings, metrics)


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """The checkpoint's model on ``device`` in ``dtype`` (its caches follow: supernet.cache) and tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    from supernet.checkpoint import load_supernet
    from supernet.device import resolve

    check_model_dir(model_dir)
    transformers.logging.set_verbosity_error()  # AutoTokenizer warns about our config's model_type
    torch_device, torch_dtype = resolve(device, dtype)
    model = load_supernet(model_dir, dtype=torch_dtype, device=torch_device)
    if (Path(model_dir) / "tokenizer_config.json").is_file() or model.config.base_model is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:  # a delta checkpoint shipped without tokenizer files: its teacher's tokenizer is the one
        from supernet.teacher import load_teacher

        _, tokenizer = load_teacher(model.config.base_model)
    return model, tokenizer


def serve(model_dir: str | Path, options: ServeOptions | None = None) -> None:
    """Load the checkpoint and serve it until SIGINT/SIGTERM (which drain in-flight requests, then exit)."""
    import torch

    opts = options or ServeOptions()
    logging.basicConfig(
        level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.set_num_threads(opts.threads or default_threads())
    model, tokenizer = load_model(model_dir, opts.device, opts.dtype)
    presets = None
    if opts.presets_file is not None:
        presets = load_presets_file(opts.presets_file, model.config.num_hidden_layers)
    max_len = opts.max_model_len or model.config.max_position_embeddings
    config = EngineConfig(
        max_model_len=max_len,
        max_num_seqs=opts.max_num_seqs,
        prefill_chunk=opts.prefill_chunk,
        memory_budget=int(opts.cache_budget_gib * GiB),
        max_queue=opts.max_queue,
        enable_prefix_caching=opts.enable_prefix_caching,
    )
    app = build_app(
        model,
        tokenizer,
        model_dir=model_dir,
        served_model_name=opts.served_model_name,
        presets=presets,
        engine_config=config,
        api_key=opts.api_key,
        allow_custom_placement=opts.allow_custom_placement,
        shutdown_timeout=opts.shutdown_timeout,
        auto=opts.auto_config(),
    )
    engine = app.state.engine
    log.info(
        "model %s on %s (%s): %d presets (%s); OpenAI API at http://%s:%d/v1",
        engine.info.name,
        model.embed_tokens.weight.device,
        model.embed_tokens.weight.dtype,
        len(engine.info.presets.names),
        engine.info.presets.source,
        opts.host,
        opts.port,
    )
    run_app(app, opts)


def run_app(app, opts: ServeOptions) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM (both backends)."""
    import uvicorn

    uvicorn.run(
        app,
        host=opts.host,
        port=opts.port,
        log_level=opts.log_level,
        timeout_graceful_shutdown=math.ceil(opts.shutdown_timeout),  # uvicorn takes whole seconds
    )
