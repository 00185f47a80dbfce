"""Presets: named placements a client picks by model id (``<model>:<preset>``).

The placement optimiser (placement/) writes ``presets.yaml`` next to the checkpoint in the format of
``supernet.presets`` (the one schema both sides use); the server takes ``default`` and each preset's ``name``
and ``placement`` from it and checks every placement against the model's depth at start-up.

Without that file the server uses BUILTIN_PRESETS: one preset per mixer plus interleaved hybrids in the style
of Qwen3-Next (one FA layer in every four) -- names that mean the same thing on every depth of model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from supernet.placement import Placement, PlacementError, format_placement, parse_placement
from supernet.presets import PRESETS_FILE, PresetsFileError, read_presets

# name -> placement spec; the first entry is the default.
BUILTIN_PRESETS: dict[str, str] = {
    "all-fa": "all-fa",
    "all-swa": "all-swa",
    "all-gdn": "all-gdn",
    "all-kda": "all-kda",
    "fa-every-4:gdn": "fa-every-4:gdn",
    "fa-every-4:kda": "fa-every-4:kda",
    "swa-every-2:gdn": "swa-every-2:gdn",
}


class PresetError(ValueError):
    """A presets file or preset name that cannot be used; the message names the bad value."""


AUTO = "auto"  # reserved: the per-request choice of serving.auto_preset, not a placement


@dataclass(frozen=True)
class Preset:
    name: str
    placement: Placement
    # from presets.yaml when the search wrote them (None for built-in or hand-written presets): the weighted
    # quality measured on held-out data (higher is better) and the decode speed-up vs all-FA; the auto preset
    # (serving.auto_preset) chooses by these two
    quality: float | None = None
    speedup: float | None = None

    @property
    def spec(self) -> str:
        return format_placement(self.placement)


@dataclass(frozen=True)
class PresetTable:
    """Every preset the server offers, in a stable order, and which one the bare model id means."""

    presets: Mapping[str, Preset]
    default: str
    source: str  # "builtin" or the presets.yaml path: shown in /v1/models and the start-up log

    def __post_init__(self) -> None:
        if self.default not in self.presets:
            raise PresetError(f"default preset {self.default!r} is not among {list(self.presets)}")

    def get(self, name: str) -> Preset:
        try:
            return self.presets[name]
        except KeyError:
            raise PresetError(f"unknown preset {name!r}; available: {', '.join(self.presets)}") from None

    @property
    def names(self) -> list[str]:
        return list(self.presets)


def table_from_specs(
    specs: Mapping[str, str] | Sequence[tuple[str, str]],
    num_layers: int,
    default: str | None = None,
    source: str = "builtin",
    scores: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> PresetTable:
    """``scores``: name -> (measured quality, speed-up) for the presets that have them."""
    items = list(specs.items()) if isinstance(specs, Mapping) else list(specs)
    if not items:
        raise PresetError(f"{source}: no presets")
    presets: dict[str, Preset] = {}
    for name, spec in items:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise PresetError(f"{source}: preset name {name!r} must be a non-empty string without spaces")
        if name in presets:
            raise PresetError(f"{source}: preset {name!r} is defined twice")
        if name == AUTO:
            raise PresetError(f"{source}: preset name {AUTO!r} is reserved (the server's automatic choice)")
        quality, speedup = (scores or {}).get(name, (None, None))
        try:
            presets[name] = Preset(name, parse_placement(spec, num_layers), quality, speedup)
        except PlacementError as err:
            raise PresetError(f"{source}: preset {name!r}: {err}") from err
    return PresetTable(presets, default or items[0][0], source)


def builtin_presets(num_layers: int) -> PresetTable:
    return table_from_specs(BUILTIN_PRESETS, num_layers)


def load_presets_file(path: str | Path, num_layers: int) -> PresetTable:
    try:
        doc = read_presets(path)
    except PresetsFileError as err:
        raise PresetError(str(err)) from None
    items = [(p.name, p.placement) for p in doc.presets]
    scores = {p.name: (p.measured_quality, p.speedup) for p in doc.presets}
    return table_from_specs(items, num_layers, default=doc.default_name, source=str(path), scores=scores)


def load_presets(model_dir: str | Path | None, num_layers: int) -> PresetTable:
    """``<model_dir>/presets.yaml`` when it exists, else the built-in set."""
    if model_dir is not None and (Path(model_dir) / PRESETS_FILE).is_file():
        return load_presets_file(Path(model_dir) / PRESETS_FILE, num_layers)
    return builtin_presets(num_layers)
