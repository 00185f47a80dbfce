"""Placement strings: shorthands, aliases and errors that list the valid names."""

from __future__ import annotations

import pytest

from supernet.placement import PlacementError, format_placement, parse_placement


def test_shorthands() -> None:
    assert parse_placement("all-gdn", 3) == ("gdn", "gdn", "gdn")
    assert parse_placement("fa-every-4:gdn", 8) == ("gdn", "gdn", "gdn", "fa") * 2
    assert parse_placement("attention,sliding_window,GDN,kda", 4) == ("fa", "swa", "gdn", "kda")
    assert parse_placement("fa*2,gdn*3", 5) == ("fa", "fa", "gdn", "gdn", "gdn")
    assert parse_placement(["fa", "kda"], 2) == ("fa", "kda")


def test_format_round_trips() -> None:
    placement = ("fa", "fa", "swa", "gdn", "gdn", "gdn", "kda")
    assert format_placement(placement) == "fa*2,swa,gdn*3,kda"
    assert parse_placement(format_placement(placement), 7) == placement


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("all-mamba", "unknown mixer 'mamba'; valid mixers: fa, swa, gdn, kda"),
        ("fa,gdn", "placement has 2 layer(s) but the model has 4"),
        ("", "empty placement"),
        ("gdn*x", "bad repeat count"),
        ("fa-every-0:gdn", "period"),
    ],
)
def test_errors_are_clear(spec: str, needle: str) -> None:
    with pytest.raises(PlacementError) as err:
        parse_placement(spec, 4)
    assert needle in str(err.value)
