"""``supernet serve``: registered into the main CLI by supernet/cli.py (heavy imports stay in the body)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer


def register(app: typer.Typer) -> None:
    app.command()(serve)


def serve(
    model: Annotated[
        Path | None, typer.Option(help="supernet checkpoint directory (default: the demo, supernet/demo)")
    ] = None,
    host: Annotated[str, typer.Option(help="interface to bind (0.0.0.0 to listen on every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="model id clients send (default: the checkpoint directory's name)")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SUPERNET_API_KEY", help="require 'Authorization: Bearer KEY' on /v1")
    ] = None,
    presets: Annotated[
        Path | None, typer.Option(help="presets.yaml (default: MODEL/presets.yaml, else the built-in set)")
    ] = None,
    allow_custom_placement: Annotated[
        bool, typer.Option("--allow-custom-placement", help="let requests send an explicit `placement`")
    ] = False,
    max_model_len: Annotated[
        int | None, typer.Option(help="context limit (prompt + completion) (default: the model's)")
    ] = None,
    max_num_seqs: Annotated[
        int, typer.Option(help="most sequences decoded together (vLLM's default; the cache budget binds first)")
    ] = 256,
    prefill_chunk: Annotated[int, typer.Option(help="prompt tokens processed per engine step")] = 256,
    cache_budget_gib: Annotated[
        float,
        typer.Option(
            help="memory for per-request caches (KV blocks allocated as sequences grow; docs/serving.md)"
        ),
    ] = 4.0,
    max_queue: Annotated[int, typer.Option(help="requests waiting for admission before 429")] = 256,
    enable_prefix_caching: Annotated[
        bool,
        typer.Option(
            "--enable-prefix-caching/--no-enable-prefix-caching",
            help="reuse cached prompt prefixes per preset (vLLM's flag and default; docs/serving.md)",
        ),
    ] = True,
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads for the engine (default: cores - 1, at least 1)")
    ] = None,
    shutdown_timeout: Annotated[float, typer.Option(help="seconds Ctrl-C waits for in-flight requests")] = 30.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
    backend: Annotated[
        str, typer.Option(help="'embedded' (this package's engine) or 'vllm' (vLLM's engine, docs/vllm.md)")
    ] = "embedded",
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm backend: GPUs per model replica")] = 1,
    dtype: Annotated[
        str,
        typer.Option(help="weights and KV caches: auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16, ..."),
    ] = "auto",
    device: Annotated[str, typer.Option(help="embedded backend: cpu, cuda or cuda:N")] = "cpu",
    latency_target_ms: Annotated[
        float | None,
        typer.Option(help="auto preset: per-output-token latency target in ms (default 100); docs/serving.md"),
    ] = None,
    min_quality: Annotated[
        float | None,
        typer.Option(help="auto preset: quality floor, in presets.yaml's measured_quality units"),
    ] = None,
) -> None:
    """Serve a supernet over an OpenAI-compatible HTTP API (every preset is a model id)."""
    import supernet
    from serving.auto_preset import AutoPresetError
    from serving.presets import PresetError
    from serving.server import ServeError, ServeOptions
    from serving.server import serve as serve_embedded
    from supernet.device import DeviceError, resolve

    def fail(message: str) -> NoReturn:
        typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)

    for name, value, low in (
        ("--port", port, 1),
        ("--max-num-seqs", max_num_seqs, 1),
        ("--prefill-chunk", prefill_chunk, 1),
        ("--max-queue", max_queue, 1),
    ):
        if value < low or (name == "--port" and value > 65535):
            fail(f"{name} {value}: out of range")
    if log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        fail(f"--log-level {log_level!r}: expected debug, info, warning or error")
    if cache_budget_gib <= 0:
        fail(f"--cache-budget-gib {cache_budget_gib}: must be > 0")
    if max_model_len is not None and max_model_len < 2:
        fail(f"--max-model-len {max_model_len}: must be >= 2")
    options = ServeOptions(
        host=host,
        port=port,
        served_model_name=served_model_name,
        api_key=api_key,
        allow_custom_placement=allow_custom_placement,
        presets_file=presets,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        prefill_chunk=prefill_chunk,
        cache_budget_gib=cache_budget_gib,
        max_queue=max_queue,
        enable_prefix_caching=enable_prefix_caching,
        threads=threads,
        shutdown_timeout=shutdown_timeout,
        log_level=log_level.lower(),
        latency_target_ms=latency_target_ms,
        min_quality=min_quality,
        device=device,
        dtype=dtype,
    )
    try:
        options.auto_config()  # bad auto values fail here, before the model loads
        if backend == "embedded":
            resolve(device, dtype)
    except (AutoPresetError, DeviceError) as err:
        fail(str(err))
    if backend not in ("embedded", "vllm"):
        fail(f"--backend {backend!r}: expected 'embedded' or 'vllm'")
    run: Callable[[Path | str, ServeOptions], None] = serve_embedded
    if backend == "vllm":
        try:
            from serving.vllm.client import VllmSettings
            from serving.vllm.server import serve as serve_vllm
        except ImportError as err:
            fail(f"--backend vllm needs vLLM installed (pip install '.[vllm]'): {err}")
        settings = VllmSettings(tensor_parallel_size=tensor_parallel_size, dtype=dtype)
        run = functools.partial(serve_vllm, settings=settings)
    try:
        run(model if model is not None else supernet.DEMO_DIR, options)
    except (ServeError, PresetError) as err:
        fail(str(err))
    except (OSError, ValueError) as err:  # unreadable checkpoint, port in use, ...
        fail(f"cannot serve {model or supernet.DEMO_DIR}: {err}")
