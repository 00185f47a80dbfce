"""Preset naming and the presets.yaml round trip (what the server reads)."""

from __future__ import annotations

import pytest

from placement.presets import load_presets, preset_name, write_presets
from supernet.placement import parse_placement


def test_preset_names():
    taken: set[str] = set()
    assert preset_name(("fa",) * 4, 1.0, taken) == "all-fa"
    assert preset_name(("fa", "gdn", "fa", "fa"), 1.2345, taken) == "fast-1.2x"
    assert preset_name(("fa", "kda", "fa", "fa"), 1.21, taken) == "fast-1.2x-b"
    assert preset_name(("gdn",) * 4, 3.0, taken) == "fast-3x"
    assert preset_name(("swa",) * 4, 12.4, taken) == "fast-12x"


def test_presets_yaml_round_trip(tmp_path):
    cost = {"context": 8192, "batch": 8, "device": "x", "model": "analytic:h100-sxm"}
    doc = {"default": "all-fa", "cost": cost,
           "presets": [{"name": "all-fa", "placement": "fa*4", "speedup": 1.0},
                       {"name": "fast-2x", "placement": "fa,gdn*3", "speedup": 2.0}]}
    path = write_presets(tmp_path / "presets.yaml", doc)
    loaded = load_presets(path)
    assert loaded == doc
    for p in loaded["presets"]:  # every placement parses with the core parser the server uses
        assert len(parse_placement(p["placement"], 4)) == 4
    assert not list(tmp_path.glob("*.tmp"))
    doc["default"] = "fast-9x"
    write_presets(path, doc)
    with pytest.raises(ValueError, match="default 'fast-9x' is not one of the presets"):
        load_presets(path)
