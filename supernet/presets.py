"""The ``presets.yaml`` format: named placements stored next to a checkpoint.

The placement search (``supernet place search``) writes it; the server (``supernet serve``) reads it. Both go
through this one schema, so a field the writer adds is a field the reader knows, and a typo in a hand-edited
file is an error naming the field instead of a silently ignored key::

    default: all-fa                        # optional; the first preset when absent
    cost: {context: 8192, batch: 8, device: "...", model: "analytic:h100-sxm"}    # optional
    quality: {weights: {trace_loglik: 1.0}, eval: "...", checkpoint: "<hash>"}    # optional
    presets:
      - name: all-fa
        placement: "fa*30"                 # supernet.placement syntax, or a YAML list of mixer names
        speedup: 1.0                       # every other per-preset field is optional (see PresetEntry)

Placements stay strings here: they are checked against a model's depth by whoever loads them for a model
(``serving.presets.load_presets``), since the file itself does not know the depth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from supernet.atomic import atomic_write
from supernet.config import MixerName
from supernet.validation import describe

PRESETS_FILE = "presets.yaml"


class PresetsFileError(ValueError):
    """A presets file that cannot be used; the message names the file and the bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PresetEntry(_Strict):
    """One named placement, plus how the search scored it (all optional for hand-written files)."""

    name: str = Field(pattern=r"^\S+$", description="non-empty, no spaces: it becomes part of a model id")
    placement: str
    predicted_quality: float | None = None  # the surrogate's prediction
    measured_quality: float | None = None  # the weighted quality actually measured
    source: Literal["dp", "measured"] | None = None  # the DP's pick, or a measured placement that beat it
    metrics: dict[str, float] = Field(default_factory=dict)  # each quality metric, measured
    needle_acc_by_length: dict[int, float] = Field(default_factory=dict)
    cost: float | None = None  # seconds per decode step under the file's cost model
    speedup: float | None = None  # vs all-FA under the same cost model
    kv_bytes_per_seq: int | None = None  # KV cache + recurrent state per sequence at the cost model's context
    mixers: dict[MixerName, int] | None = None  # layer count per mixer
    # self-speculative decoding (serving.spec_policy, docs/speculative.md): the preset that drafts for this
    # one, the prompt length from which speculation is on by default, and the measurements behind both
    draft: str | None = None
    speculative_from_context: int | None = Field(default=None, ge=1)
    speculative_measured: list[SpecMeasurement] = Field(default_factory=list)

    @field_validator("placement", mode="before")
    @classmethod
    def _join_list(cls, value: object) -> object:
        """A YAML list of mixer names is accepted as well as a spec string."""
        return ",".join(map(str, value)) if isinstance(value, list) else value


class SpecMeasurement(_Strict):
    """One speculative decoding measurement (benchmarks/bench_spec_decode.py): this preset as the target."""

    context: int
    batch: int
    speedup: float  # decode tokens/s with speculation / without, same process, same prompts
    acceptance: float  # accepted / drafted tokens
    tokens_per_step: float  # tokens per verify step
    draft: str


class CostInfo(_Strict):
    """The cost model the speed-ups were computed under."""

    context: int
    batch: int
    device: str
    model: str


class QualityInfo(_Strict):
    """How quality was measured: metric weights, evaluation data, and the checkpoint's hash."""

    weights: dict[str, float]
    eval: str
    checkpoint: str
    model_dir: str | None = None


class PresetsFile(_Strict):
    default: str | None = None
    cost: CostInfo | None = None
    quality: QualityInfo | None = None
    presets: list[PresetEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> PresetsFile:
        names = [p.name for p in self.presets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"preset name(s) {twice} defined more than once")
        if self.default is not None and self.default not in names:
            raise ValueError(f"default {self.default!r} is not one of the presets {names}")
        for p in self.presets:
            if p.draft is not None and p.draft not in names:
                raise ValueError(f"preset {p.name!r}: draft {p.draft!r} is not one of the presets {names}")
        return self

    @property
    def default_name(self) -> str:
        return self.default if self.default is not None else self.presets[0].name


def read_presets(path: str | Path) -> PresetsFile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PresetsFileError(f"{path}: invalid YAML ({err})") from err
    except OSError as err:
        raise PresetsFileError(f"{path}: cannot read ({err.strerror})") from err
    try:
        return PresetsFile.model_validate(data)
    except ValidationError as err:
        raise PresetsFileError(f"{path}: {describe(err, PresetsFile)}") from None


def write_presets(path: str | Path, document: PresetsFile, header: str = "") -> Path:
    """Write atomically (temp file + rename), so a server never reads half a file; ``header`` is prepended as
    comment lines."""
    text = "".join(f"# {line}\n" for line in header.splitlines())
    text += yaml.safe_dump(document.model_dump(exclude_none=True), sort_keys=False, width=120)
    return atomic_write(path, text)


def preset_placements(model_dir: str | Path) -> dict[str, str]:
    """``{preset name: placement spec}`` from the presets.yaml beside a checkpoint ({} when it has none)."""
    path = Path(model_dir) / PRESETS_FILE
    if not path.is_file():
        return {}
    return {p.name: p.placement for p in read_presets(path).presets}


def resolve_placement(spec: str, model_dir: str | Path) -> str:
    """A preset name of the checkpoint (``fast-3.5x``) becomes its placement; anything else is returned as
    is, to be parsed as placement syntax (so names and specs work alike on the command line)."""
    return preset_placements(model_dir).get(spec, spec)
