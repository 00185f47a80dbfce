"""What a placement search may return: allowed mixers per layer, a minimum number of FA layers, and a KV/state
memory budget per sequence; plus the ``--allowed`` syntax."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from supernet.config import MIXER_NAMES
from supernet.placement import PlacementError, canonical_mixer


class InfeasibleError(ValueError):
    """No placement satisfies the constraints (or the budget)."""


@dataclass
class Constraints:
    num_layers: int
    allowed: list[tuple[str, ...]] | None = None  # per layer; None = every mixer everywhere
    min_fa: int = 0
    kv_budget: float | None = None  # bytes per sequence (at the cost model's context)
    per_layer: list[tuple[str, ...]] = field(init=False)  # ``allowed`` with None filled in

    def __post_init__(self) -> None:
        self.per_layer = list(self.allowed) if self.allowed is not None else [MIXER_NAMES] * self.num_layers
        if len(self.per_layer) != self.num_layers:
            raise PlacementError(
                f"allowed mixers given for {len(self.per_layer)} layer(s) but the model has {self.num_layers}"
            )
        if not 0 <= self.min_fa <= self.num_layers:
            raise InfeasibleError(
                f"--min-fa {self.min_fa}: must be between 0 and the number of layers ({self.num_layers})"
            )
        fa_slots = sum("fa" in a for a in self.per_layer)
        if fa_slots < self.min_fa:
            raise InfeasibleError(f"--min-fa {self.min_fa} is infeasible: FA is allowed on only {fa_slots} layer(s)")

    def admits(self, placement: Sequence[str], kv_bytes: Mapping[str, float] | None = None) -> bool:
        if any(m not in a for m, a in zip(placement, self.per_layer, strict=True)):
            return False
        if sum(m == "fa" for m in placement) < self.min_fa:
            return False
        if self.kv_budget is not None and kv_bytes is not None:
            return sum(kv_bytes[m] for m in placement) <= self.kv_budget
        return True


def parse_allowed(spec: str | None, num_layers: int) -> list[tuple[str, ...]] | None:
    """Per-layer allowed mixers: a comma list (one item per layer, ``*N`` repeats) of ``a|b`` alternatives or
    ``any``; or ``all-a|b`` for every layer. E.g. ``fa,any*28,fa`` or ``all-fa|swa|gdn``."""
    if spec is None or not spec.strip():
        return None

    def one(item: str) -> tuple[str, ...]:
        item = item.strip().lower()
        if item in ("any", "*", ""):
            return MIXER_NAMES
        names = tuple(dict.fromkeys(canonical_mixer(x) for x in item.split("|")))
        return tuple(m for m in MIXER_NAMES if m in names)

    text = spec.strip()
    if text.lower().startswith("all-"):
        return [one(text[4:])] * num_layers
    out: list[tuple[str, ...]] = []
    for item in text.split(","):
        name, _, count = item.partition("*")
        if count and not count.strip().isdigit():
            raise PlacementError(f"bad repeat count in {item.strip()!r}; expected e.g. 'any*28'")
        out.extend([one(name)] * (int(count) if count else 1))
    if len(out) != num_layers:
        raise PlacementError(
            f"--allowed lists {len(out)} layer(s) but the model has {num_layers}; "
            f"use one item per layer (with *N repeats) or 'all-fa|swa|gdn'"
        )
    return out
