"""``supernet train`` and ``supernet eval`` (registered by supernet/cli.py; heavy imports stay inside the
bodies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from supernet.device import DeviceOpt, DtypeOpt


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def device_overrides(device: str, dtype: str) -> list[str]:
    """``--device``/``--dtype`` as config overrides. The trainer keeps weights and optimiser state in fp32 and
    runs bf16 as autocast (``run.autocast``); it builds its models on the CPU, so a GPU device is refused
    rather than silently ignored."""
    import torch

    from supernet.device import DeviceError, parse_device, parse_dtype

    parsed = parse_device(device)
    if parsed.type != "cpu":
        raise DeviceError(f"--device {device!r}: training runs on the CPU (torchrun for more processes)")
    if dtype == "auto":
        return []
    autocast = {torch.float32: "none", torch.bfloat16: "bf16"}.get(parse_dtype(dtype, parsed))
    if autocast is None:
        raise DeviceError(f"--dtype {dtype!r}: training takes float32 or bfloat16 (as run.autocast)")
    return [f"run.autocast={autocast}"]


def train_command(
    config: Annotated[
        Path,
        typer.Argument(
            help="training config (.yaml/.yml or .toml); fields: supernet/training/"
            "config.py, example: supernet/demo/train.yaml"
        ),
    ],
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the run's newest complete checkpoint")
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field, e.g. --set optim.steps=10")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu (training places the model on the CPU)")] = "cpu",
    dtype: Annotated[
        str,
        typer.Option(help="auto (the config's run.autocast), float32 (run.autocast=none) or bfloat16 (=bf16)"),
    ] = "auto",
) -> None:
    """Distil a supernet from its frozen teacher (blockwise warm start, then stochastic placements).

    Runs on one process as is; under `torchrun --nproc_per_node N -m supernet.cli train CONFIG` it trains
    data-parallel."""
    from supernet.checkpoint import CheckpointError
    from supernet.device import DeviceError
    from supernet.training.config import load_train_config
    from supernet.training.data import DataError
    from supernet.training.trainer import train

    try:
        set_ = [*(set_ or []), *device_overrides(device, dtype)]
    except DeviceError as err:
        _fail(str(err))
    try:
        cfg = load_train_config(config, set_)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    try:
        result = train(cfg, resume=resume)
    except (FileNotFoundError, FileExistsError, DataError, CheckpointError, ValueError) as err:
        _fail(str(err))
    if result["eval"]:
        from supernet.training.evaluate import format_table

        typer.echo(format_table(result["eval"]))
    typer.echo(f"trained supernet: {result['final']}")


def eval_command(
    model: Annotated[Path, typer.Option(help="supernet checkpoint directory")],
    data: Annotated[
        str, typer.Option(help="held-out text: a .txt/.jsonl/.parquet file, a folder, or 'demo'")
    ],
    placement: Annotated[
        list[str], typer.Option(help="placement(s) or the model's preset names to score; repeat for several")
    ],
    teacher: Annotated[
        str | None,
        typer.Option(
            help="teacher spec; default: the checkpoint's base_model, else its own all-FA placement"
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option(help="tokens per evaluation sequence")] = 1024,
    max_tokens: Annotated[int, typer.Option(help="evaluate on at most this many tokens")] = 32768,
    batch_size: Annotated[int, typer.Option(help="sequences per forward")] = 4,
    text_field: Annotated[str, typer.Option(help="JSONL/parquet text field")] = "text",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the results as JSON here")
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
) -> None:
    """Held-out perplexity and KL to the teacher per placement (the teacher pass is shared by all of them)."""
    import torch
    from transformers import AutoTokenizer

    from supernet.checkpoint import CheckpointError, load_supernet
    from supernet.device import DeviceError, resolve
    from supernet.placement import PlacementError
    from supernet.training.data import DataError, tokenize_file
    from supernet.training.evaluate import evaluate_placements, format_table, hf_teacher_fn

    if seq_len < 2 or max_tokens < seq_len or batch_size < 1:
        _fail(f"--seq-len {seq_len} must be >= 2, --max-tokens {max_tokens} >= it, "
              f"--batch-size {batch_size} >= 1")
    from supernet.presets import resolve_placement

    try:
        torch_device, torch_dtype = resolve(device, dtype)
    except DeviceError as err:
        _fail(str(err))
    try:
        net = load_supernet(model, dtype=torch_dtype, device=torch_device)
        placements = {p: resolve_placement(p, model) for p in placement}  # preset names -> their placements
        for p in placements.values():
            net.placement(p)
        tokenizer = AutoTokenizer.from_pretrained(model)
        ids = torch.from_numpy(tokenize_file(data, tokenizer, seq_len, max_tokens, text_field)).long()
    except (CheckpointError, FileNotFoundError, PlacementError, DataError, ValueError) as err:
        _fail(str(err))
    spec = teacher or net.config.base_model
    teacher_fn, label = None, "the model's own all-FA placement"
    if spec:
        from supernet.teacher import load_teacher

        try:
            hf, _ = load_teacher(spec)
        except (OSError, ValueError) as err:
            _fail(f"cannot load teacher {spec!r}: {err}")
        teacher_fn, label = hf_teacher_fn(hf.to(device=torch_device, dtype=torch_dtype)), spec
    scored = evaluate_placements(
        net, ids, list(placements.values()), teacher=teacher_fn, batch_size=batch_size, include_teacher=True
    )
    results = {name: scored[name if name == "teacher" else placements[name]] for name in ["teacher", *placements]}
    typer.echo(f"{ids.numel()} tokens ({len(ids)} x {seq_len}) from {data}; teacher: {label}")
    typer.echo(format_table(results, net, placements))
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {"tokens": ids.numel(), "seq_len": seq_len, "teacher": label, "results": results}, indent=2
            )
        )
