"""When to speculate and how far: the draft preset per target, on/off per request, k per sequence.

* Which draft: ``presets.yaml`` names a ``draft`` preset per target preset (``benchmarks/bench_spec_decode.py
  --write`` picks it by measured acceptance x measured speed and writes it). A preset without one gets the
  preset whose decode step reads the fewest bytes at the server's context length (``default_drafts``).
* On by default where it pays: ``speculative_from_context`` per target preset (written by the same benchmark from
  its measured speed-ups) turns speculation on for prompts at least that long. A request's ``speculative``
  field overrides it either way. The decision is made once per request, from its preset and prompt length only,
  so a seeded request's tokens never depend on what else the server is doing.
* How far (k): each sequence keeps a running acceptance rate ``a`` (exponentially decayed counts, so it follows
  the text) and drafts the k that maximises expected tokens per unit of time,
  ``(1 - a^(k+1)) / (1 - a) / (1 + k r)``, where ``r`` is the cost of a draft step relative to a verify step. A
  decode step at batch 1 is bound by the bytes it reads, so ``r`` is the ratio of bytes read per step (shared
  weights + the mixers used + each layer's cache at the request's context: ``step_bytes``). When no k pays
  (low acceptance, or a draft that is not much cheaper) the sequence pauses speculation for ``probe_every``
  steps and then tries k = 1 again. Everything here depends only on the sequence's own history, so it is
  deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from serving.memory import state_bytes
from serving.presets import PresetTable
from supernet.model import SupernetForCausalLM
from supernet.placement import Placement
from supernet.presets import read_presets


@dataclass(frozen=True)
class DraftPlan:
    draft: str  # draft preset name
    placement: Placement
    from_context: int | None = None  # speculation on by default for prompts at least this long; None = never


@dataclass
class SpecConfig:
    drafts: Mapping[str, DraftPlan] = field(default_factory=dict)  # target preset name -> its draft
    k_max: int = 6  # the most tokens drafted per step (also bounded by the SWA window - 1)
    k_start: int = 3  # k of a sequence before it has any acceptance history (fixed k when not adaptive)
    adaptive: bool = True  # False: always draft k_start tokens (tests, measurements)
    prior: tuple[float, float] = (2.0, 3.0)  # (accepted, trials) pseudo-counts: a ~0.67 before any evidence
    decay: float = 0.8  # weight of the past per step in the running acceptance counts
    probe_every: int = 16  # steps without speculation after it stopped paying, before trying k = 1 again

    def __post_init__(self) -> None:
        if not 1 <= self.k_start <= self.k_max:
            raise ValueError(f"need 1 <= k_start <= k_max, got k_start={self.k_start}, k_max={self.k_max}")


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens emitted per verify step when each draft is accepted independently with probability a."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def best_k(acceptance: float, cost_ratio: float, k_max: int) -> tuple[int, float]:
    """(k, expected speed-up over plain decoding) maximising tokens per unit time; k = 0 when nothing pays."""
    best, gain = 0, 1.0
    for k in range(1, k_max + 1):
        g = expected_tokens(acceptance, k) / (1.0 + k * cost_ratio)
        if g > gain:
            best, gain = k, g
    return best, gain


_WEIGHT_BYTES: dict[tuple[int, Placement], int] = {}


def step_bytes(model: SupernetForCausalLM, placement: Placement, context: int) -> int:
    """Bytes a batch-1 decode step reads at ``context``: shared weights, the placement's mixers, its caches."""
    key = (id(model), placement)
    if key not in _WEIGHT_BYTES:
        total = 0
        for name, p in model.named_parameters():
            if ".mixers." in name:
                layer, mixer = int(name.split(".")[1]), name.split(".mixers.")[1].split(".")[0]
                if placement[layer] != mixer:
                    continue
            total += p.numel() * p.element_size()
        _WEIGHT_BYTES[key] = total
    dtype = model.embed_tokens.weight.dtype
    return _WEIGHT_BYTES[key] + state_bytes(model.config, placement, context, dtype)


def default_drafts(
    model: SupernetForCausalLM, presets: Mapping[str, Placement], context: int
) -> dict[str, DraftPlan]:
    """Without a measured choice: each preset's draft is the preset reading the fewest bytes per step at
    ``context`` (when that is cheaper than the target itself); off by default (``from_context`` None)."""
    cost = {name: step_bytes(model, p, context) for name, p in presets.items()}
    cheapest = min(cost, key=lambda name: cost[name])
    return {
        name: DraftPlan(cheapest, presets[cheapest])
        for name in presets
        if cost[cheapest] < cost[name]
    }


def spec_config_from_presets(model: SupernetForCausalLM, table: PresetTable, context: int) -> SpecConfig:
    """Drafts for a server's presets: ``default_drafts``, overridden by presets.yaml's ``draft`` and
    ``speculative_from_context`` where the table came from a file."""
    drafts = default_drafts(model, {name: p.placement for name, p in table.presets.items()}, context)
    if table.source != "builtin" and Path(table.source).is_file():
        for entry in read_presets(table.source).presets:
            if entry.draft is not None and entry.draft != entry.name:
                drafts[entry.name] = DraftPlan(entry.draft, table.get(entry.draft).placement)
            if entry.name in drafts and entry.speculative_from_context is not None:
                drafts[entry.name] = replace(drafts[entry.name], from_context=entry.speculative_from_context)
    return SpecConfig(drafts=drafts)
