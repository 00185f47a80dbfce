"""Preset names and the presets.yaml the search writes (schema: supernet.presets, shared with the server).

Preset names say what a user picks them for, speed: ``all-fa`` is the teacher-exact placement (speed-up 1.0),
every other preset is ``fast-<speed-up>x`` with the speed-up under the file's cost model rounded to one
decimal below 10 (``fast-1.6x``, ``fast-3x``) and to an integer above (``fast-12x``). A clash gets ``-b``,
``-c``... The server uses ``default`` and each preset's ``name`` and ``placement``; everything else documents
where the preset came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from supernet.presets import MixerName, PresetsFile, write_presets

HEADER = (
    "Written by `supernet place search` (docs/placement.md). The server reads `default` and each preset's\n"
    "`name` and `placement` (supernet.placement syntax); the rest records where it came from."
)


def preset_name(placement: Sequence[str], speedup: float, taken: set[str]) -> str:
    if all(m == "fa" for m in placement):
        base = "all-fa"
    else:
        x = round(speedup, 1) if speedup < 10 else round(speedup)
        base = f"fast-{x:g}x"
    name, suffix = base, ord("b")
    while name in taken:
        name, suffix = f"{base}-{chr(suffix)}", suffix + 1
    taken.add(name)
    return name


def mixer_counts(placement: Sequence[str]) -> dict[MixerName, int]:
    return {m: sum(x == m for x in placement) for m in get_args(MixerName)}


def save_presets(path: str | Path, document: PresetsFile) -> Path:
    """Write the presets document atomically, with a comment saying who wrote it and what is read."""
    return write_presets(path, document, header=HEADER)
