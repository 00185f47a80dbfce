"""``supernet serve --backend vllm``: our OpenAI-compatible HTTP layer over vLLM's async engine."""

from __future__ import annotations

import logging
from pathlib import Path

from serving.server import ServeError, ServeOptions, check_model_dir, default_model_name, run_app

log = logging.getLogger("serving.vllm")

GiB = 1 << 30


def load_tokenizer(model_dir: str | Path):
    import transformers
    from transformers import AutoTokenizer

    from supernet.config import SupernetConfig

    transformers.logging.set_verbosity_error()
    if (Path(model_dir) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(model_dir)
    base = SupernetConfig.load(model_dir).base_model
    if base is None:
        raise ServeError(f"{model_dir}: no tokenizer files and no base_model to take them from")
    from supernet.teacher import load_teacher

    return load_teacher(base)[1]


def build_vllm_app(model_dir: str | Path, options: ServeOptions, settings=None):
    """The FastAPI app of serving.api over a VllmEngine (the engine starts here, before the app)."""
    from serving.api import ServerSettings, create_app
    from serving.metrics import ServingMetrics
    from serving.vllm.client import VllmEngine, VllmSettings

    settings = settings or VllmSettings()
    settings.max_model_len = options.max_model_len or settings.max_model_len
    settings.max_num_seqs = options.max_num_seqs
    settings.max_num_batched_tokens = settings.max_num_batched_tokens or options.prefill_chunk
    settings.kv_cache_bytes = settings.kv_cache_bytes or int(options.cache_budget_gib * GiB)
    if options.presets_file is not None:
        settings.presets = str(options.presets_file)
    name = options.served_model_name or default_model_name(model_dir)
    engine = VllmEngine(model_dir, settings, name, load_tokenizer(model_dir))
    server_settings = ServerSettings(
        api_key=options.api_key,
        allow_custom_placement=options.allow_custom_placement,
        shutdown_timeout=options.shutdown_timeout,
    )
    return create_app(engine, server_settings, ServingMetrics())


def serve(model_dir: str | Path, options: ServeOptions | None = None, settings=None) -> None:
    """Load the checkpoint into vLLM and serve it until SIGINT/SIGTERM."""
    opts = options or ServeOptions()
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_model_dir(model_dir)
    app = build_vllm_app(model_dir, opts, settings)
    engine = app.state.engine
    log.info(
        "model %s on vLLM: presets %s; OpenAI API at http://%s:%d/v1",
        engine.info.name,
        ", ".join(engine.info.presets.names),
        opts.host,
        opts.port,
    )
    run_app(app, opts)
