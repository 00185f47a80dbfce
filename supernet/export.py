"""``supernet export``: a thin checkpoint holding only the mixers some chosen presets use.

A supernet stores four mixers per layer; a deployment that serves a few presets needs, at each layer, only the
mixers those presets place there. The export keeps the trunk exactly as the source holds it (a delta checkpoint
stays a delta on the same teacher), drops every other mixer's tensors, and writes a ``presets.yaml`` with just
the chosen presets, so a server started on the export serves exactly them. The weights file records which
mixers each layer kept (metadata ``mixers``); the vLLM plugin (serving/vllm) loads such checkpoints, the
embedded engine needs a full supernet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

PRESETS_FILE = "presets.yaml"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
_MIXER = re.compile(r"^layers\.(\d+)\.mixers\.([a-z]+)\.")


def mixer_of(name: str) -> tuple[int, str] | None:
    """(layer, mixer) for a tensor under ``layers.<i>.mixers.<name>.``, else None (trunk)."""
    match = _MIXER.match(name)
    return (int(match[1]), match[2]) if match else None


def layer_mixers(placements: Sequence[Sequence[str]], num_layers: int) -> list[tuple[str, ...]]:
    """Per layer, the mixers some placement uses there, in MIXER_NAMES order."""
    from supernet.config import MIXER_NAMES

    used: list[set[str]] = [set() for _ in range(num_layers)]
    for placement in placements:
        for i, name in enumerate(placement):
            used[i].add(name)
    return [tuple(m for m in MIXER_NAMES if m in names) for names in used]


def export_presets(model_dir: str | Path, presets: Sequence[str], out: str | Path) -> Path:
    """Write the thin checkpoint for ``presets`` (preset names of ``model_dir``, or placement specs such as
    ``all-gdn``, which become presets of that name) into ``out``. The first one is the default."""
    from safetensors.torch import save_file

    from supernet.checkpoint import read_tensors
    from supernet.config import SupernetConfig
    from supernet.placement import format_placement, parse_placement
    from supernet.presets import PresetEntry, PresetsFile, read_presets, write_presets

    model_dir, out = Path(model_dir), Path(out)
    if not presets:
        raise ValueError("give at least one preset to export")
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"{out}: the export must go to a new directory, not over its source")
    config = SupernetConfig.load(model_dir)
    source = read_presets(model_dir / PRESETS_FILE) if (model_dir / PRESETS_FILE).is_file() else None
    known = {p.name: p for p in source.presets} if source else {}
    entries = []
    for name in dict.fromkeys(presets):
        entry = known.get(name) or PresetEntry(name=name, placement=name)
        placement = parse_placement(entry.placement, config.num_hidden_layers)  # PlacementError names the value
        entries.append(entry.model_copy(update={"placement": format_placement(placement)}))
    names = {e.name for e in entries}
    entries = [e if e.draft in (None, *names) else e.model_copy(update={"draft": None}) for e in entries]
    keep = layer_mixers(
        [parse_placement(e.placement, config.num_hidden_layers) for e in entries], config.num_hidden_layers
    )

    tensors, metadata = read_tensors(model_dir)
    kept = {}
    for key, tensor in tensors.items():
        where = mixer_of(key)
        if where is None or where[1] in keep[where[0]]:
            kept[key] = tensor
    crcs = json.loads(metadata.get("crc32", "{}"))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(
        kept,
        str(tmp),
        metadata={
            "format": "pt",
            "kind": metadata.get("kind", "full"),
            "crc32": json.dumps({k: crcs[k] for k in kept if k in crcs}, sort_keys=True),
            "mixers": json.dumps([list(m) for m in keep]),
        },
    )
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(out / "model.safetensors")
    config.save(out)
    write_presets(
        out / PRESETS_FILE,
        PresetsFile(default=entries[0].name, presets=entries),
        header=f"Exported by `supernet export` from {model_dir.name}: only these presets' mixers are kept.",
    )
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    return out


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    model: Annotated[Path, typer.Option(help="supernet checkpoint directory to export from")],
    out: Annotated[Path, typer.Option(help="output directory for the thin checkpoint")],
    preset: Annotated[
        list[str], typer.Option(help="preset name (or placement spec) to keep; repeat for several, first = default")
    ],
) -> None:
    """Write a thin checkpoint holding only the mixers the given presets use (for vLLM serving)."""
    from supernet.placement import PlacementError
    from supernet.presets import PresetsFileError

    try:
        path = export_presets(model, preset, out)
    except (FileNotFoundError, PlacementError, PresetsFileError, ValueError) as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    size = (path / "model.safetensors").stat().st_size
    typer.echo(f"wrote {path} ({size / 2**20:.1f} MiB; presets: {', '.join(dict.fromkeys(preset))})")
