"""Placements: one mixer name per layer, written out or as a shorthand.

Accepted spellings (case-insensitive; aliases ``attention``/``full`` = ``fa``, ``sliding_window`` = ``swa``):

* ``all-gdn``                 every layer uses one mixer;
* ``fa-every-4:gdn``          FA on every 4th layer (layers 3, 7, 11, ... i.e. the last of each group of four, as in
                              Qwen3-Next's 3:1 layout), the other mixer elsewhere;
* ``fa,swa,gdn,...``          a comma list with exactly one name per layer;
* ``fa*2,gdn*28``             the same with run-length counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from supernet.config import MIXER_NAMES

Placement = tuple[str, ...]

ALIASES = {
    "fa": "fa",
    "attention": "fa",
    "full": "fa",
    "full_attention": "fa",
    "swa": "swa",
    "sliding_window": "swa",
    "sliding": "swa",
    "gdn": "gdn",
    "gated_deltanet": "gdn",
    "kda": "kda",
    "kimi": "kda",
}


class PlacementError(ValueError):
    """A placement that names an unknown mixer or has the wrong number of layers."""


def canonical_mixer(name: str) -> str:
    key = name.strip().lower()
    if key not in ALIASES:
        raise PlacementError(
            f"unknown mixer {name!r}; valid mixers: {', '.join(MIXER_NAMES)} "
            f"(aliases: {', '.join(k for k in ALIASES if k not in MIXER_NAMES)})"
        )
    return ALIASES[key]


def parse_placement(spec: str | Sequence[str], num_layers: int) -> Placement:
    """Turn a placement spec into a tuple of canonical mixer names, one per layer."""
    if isinstance(spec, str):
        names = _expand(spec.strip(), num_layers)
    else:
        names = [canonical_mixer(n) for n in spec]
    if len(names) != num_layers:
        raise PlacementError(
            f"placement has {len(names)} layer(s) but the model has {num_layers}; "
            f"use one mixer per layer or a shorthand like 'all-fa' or 'fa-every-4:gdn'"
        )
    return tuple(names)


def _expand(spec: str, num_layers: int) -> list[str]:
    if not spec:
        raise PlacementError(
            f"empty placement; try 'all-fa', 'fa-every-4:gdn' or a comma list of {', '.join(MIXER_NAMES)}"
        )
    lowered = spec.lower()
    if lowered.startswith("all-"):
        return [canonical_mixer(lowered[4:])] * num_layers
    every = re.fullmatch(r"([a-z_]+)-every-(\d+):([a-z_]+)", lowered)
    if every:
        sparse, period, dense = canonical_mixer(every[1]), int(every[2]), canonical_mixer(every[3])
        if period < 1:
            raise PlacementError(f"period in {spec!r} must be >= 1")
        return [sparse if (i + 1) % period == 0 else dense for i in range(num_layers)]
    names: list[str] = []
    for item in lowered.split(","):
        name, _, count = item.strip().partition("*")
        if count and not count.strip().isdigit():
            raise PlacementError(f"bad repeat count in {item.strip()!r}; expected e.g. 'gdn*4'")
        names.extend([canonical_mixer(name)] * (int(count) if count else 1))
    return names


def format_placement(placement: Sequence[str]) -> str:
    """Compact run-length form, e.g. ``fa*2,gdn*28``; parse_placement reads it back."""
    runs: list[list] = []
    for name in placement:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return ",".join(name if n == 1 else f"{name}*{n}" for name, n in runs)
