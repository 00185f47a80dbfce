"""Preset naming and the presets.yaml round trip: what the search writes is what the server loads, through the
one schema (supernet.presets)."""

from __future__ import annotations

import pytest

import supernet
from placement.presets import preset_name, save_presets
from serving.presets import PresetError, load_presets
from supernet.presets import PresetEntry, PresetsFile, PresetsFileError, read_presets


def test_preset_names():
    taken: set[str] = set()
    assert preset_name(("fa",) * 4, 1.0, taken) == "all-fa"
    assert preset_name(("fa", "gdn", "fa", "fa"), 1.2345, taken) == "fast-1.2x"
    assert preset_name(("fa", "kda", "fa", "fa"), 1.21, taken) == "fast-1.2x-b"
    assert preset_name(("gdn",) * 4, 3.0, taken) == "fast-3x"
    assert preset_name(("swa",) * 4, 12.4, taken) == "fast-12x"


def test_presets_yaml_round_trip_into_the_server(tmp_path):
    doc = PresetsFile(
        default="all-fa",
        cost={"context": 8192, "batch": 8, "device": "x", "model": "analytic:h100-sxm"},
        presets=[
            PresetEntry(name="all-fa", placement="fa*4", speedup=1.0, mixers={"fa": 4}),
            PresetEntry(name="fast-2x", placement="fa,gdn*3", speedup=2.0, needle_acc_by_length={512: 0.5}),
        ],
    )
    path = save_presets(tmp_path / "presets.yaml", doc)
    assert path.read_text().startswith("# Written by `supernet place search`")
    assert read_presets(path) == doc
    assert not list(tmp_path.glob("*.tmp"))
    table = load_presets(tmp_path, 4)  # the server's loader, on the same file
    assert table.names == ["all-fa", "fast-2x"] and table.default == "all-fa"
    assert table.get("fast-2x").placement == ("fa", "gdn", "gdn", "gdn")


def test_the_shipped_demo_presets_follow_the_schema():
    doc = read_presets(supernet.DEMO_DIR / "presets.yaml")
    assert doc.default_name == "all-fa" and doc.cost is not None and doc.quality is not None
    assert all(p.speedup is not None and p.mixers is not None for p in doc.presets)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("default: fast-9x\npresets:\n  - {name: a, placement: 'fa*4'}\n", "default 'fast-9x' is not one of"),
        ("presets:\n  - {name: a, placement: 'fa*4', speed: 2}\n", r"presets\.0\.speed: Extra inputs"),
        ("presets:\n  - {name: a, placement: 'fa*4', source: guess}\n", r"presets\.0\.source: Input should be"),
        ("presets:\n  - {name: a b, placement: 'fa*4'}\n", r"presets\.0\.name: String should match"),
        ("presets:\n  - {name: a, placement: 'fa*4'}\n  - {name: a, placement: 'gdn*4'}\n", r"\['a'\] defined"),
        ("presets: []\n", r"presets: List should have at least 1 item"),
        ("presets: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_presets_files_name_the_field(tmp_path, text, message):
    path = tmp_path / "presets.yaml"
    path.write_text(text)
    with pytest.raises(PresetsFileError, match=message):
        read_presets(path)
    with pytest.raises(PresetError, match=message):  # the server reports the same problem
        load_presets(tmp_path, 4)


def test_a_yaml_list_placement_is_accepted(tmp_path):
    (tmp_path / "presets.yaml").write_text("presets:\n  - name: mix\n    placement: [fa, swa, gdn, kda]\n")
    assert load_presets(tmp_path, 4).get("mix").placement == ("fa", "swa", "gdn", "kda")


def test_the_schema_knows_every_mixer():
    from typing import get_args

    from supernet.config import MIXER_NAMES
    from supernet.presets import MixerName

    assert get_args(MixerName) == MIXER_NAMES
