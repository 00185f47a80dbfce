"""``supernet`` command line: thin wrappers over library functions (tests call those directly)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from supernet.device import DeviceOpt, DtypeOpt

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Hybrid FA/SWA/GDN/KDA supernet: build, train, place, serve.",
)


def fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command()
def build(
    out: Annotated[Path, typer.Option(help="output checkpoint directory")],
    teacher: Annotated[
        str, typer.Option(help="'smollm2', a .gguf file, a HF directory or a hub id")
    ] = "smollm2",
    mixer_weights: Annotated[
        str, typer.Option(help="'lora' (shared teacher projections + adapters) or 'full'")
    ] = "lora",
    lora_rank: Annotated[int, typer.Option(help="adapter rank in lora mode")] = 16,
    window: Annotated[int, typer.Option(help="SWA window (tokens, query included)")] = 512,
    sinks: Annotated[int, typer.Option(help="SWA attention-sink positions kept visible (0 = plain SWA)")] = 4,
    full_checkpoint: Annotated[
        bool, typer.Option("--full-checkpoint", help="store the trunk too (self-contained)")
    ] = False,
) -> None:
    """Convert a Llama/Mistral/Qwen2-family teacher into a supernet at transfer init."""
    from supernet.checkpoint import save_supernet
    from supernet.convert import build_from_teacher
    from supernet.teacher import load_teacher

    if mixer_weights not in ("lora", "full"):
        fail(f"--mixer-weights {mixer_weights!r}: expected 'lora' or 'full'")
    if window < 1 or sinks < 0 or lora_rank < 0:
        fail(f"--window {window} must be >= 1, --sinks {sinks} and --lora-rank {lora_rank} >= 0")
    try:
        hf_teacher, tokenizer = load_teacher(teacher)
    except (OSError, ValueError) as err:
        fail(f"cannot load teacher {teacher!r}: {err}")
    model = build_from_teacher(
        hf_teacher,
        base_model=None if full_checkpoint else teacher,
        mixer_weights=mixer_weights,
        lora_rank=lora_rank,
        window=window,
        sinks=sinks,
    )
    save_supernet(model, out)
    tokenizer.save_pretrained(out)
    n_own = sum(p.numel() for p in model.trainable_mixer_parameters().values())
    typer.echo(
        f"wrote {out} ({n_own / 1e6:.1f}M supernet-own parameters, "
        f"{'full' if full_checkpoint else 'delta on ' + teacher} checkpoint)"
    )


@app.command()
def generate(
    model: Annotated[Path, typer.Option(help="supernet checkpoint directory")],
    prompt: Annotated[str, typer.Option(help="prompt text (sent as-is, no chat template)")],
    placement: Annotated[
        str, typer.Option(help="e.g. all-fa, all-gdn, fa-every-4:gdn, or a comma list")
    ] = "all-fa",
    max_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 32,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="keep going past the EOS token")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
) -> None:
    """Print a greedy continuation of PROMPT under a placement."""
    from transformers import AutoTokenizer

    from supernet.checkpoint import CheckpointError, load_supernet
    from supernet.config import SupernetConfig
    from supernet.device import DeviceError, resolve
    from supernet.generate import greedy_generate
    from supernet.placement import PlacementError, parse_placement

    if max_tokens < 1:
        fail(f"--max-tokens {max_tokens}: must be >= 1")
    try:
        torch_device, torch_dtype = resolve(device, dtype)
        spec = parse_placement(
            placement, SupernetConfig.load(model).num_hidden_layers
        )  # fail fast, before loading
        net = load_supernet(model, dtype=torch_dtype, device=torch_device)
    except (CheckpointError, DeviceError, FileNotFoundError, PlacementError, ValueError) as err:
        fail(str(err))
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(prompt)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not ignore_eos else []
    out = greedy_generate(net, ids, spec, max_tokens, eos)
    typer.echo(tokenizer.decode(out, skip_special_tokens=True))


# Subcommands that live with their subsystem: each module exposes ``register(app)`` and imports its heavy
# dependencies inside the command bodies, so `supernet --help` stays fast.
SUBCOMMAND_MODULES = ("supernet.training.cli", "placement.cli", "serving.cli", "supernet.export", "supernet.apriel2")


def _register_subcommands() -> None:
    import importlib

    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                continue  # subsystem not installed in this build
            raise
        module.register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
