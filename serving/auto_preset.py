"""The ``auto`` preset: each request runs on the most faithful preset whose predicted per-token latency meets a
target under the current load, never below a quality floor.

Why per request and not per server: presets share the batch at no switching cost (serving.engine), so the
choice can follow the load request by request -- under load new requests go to faster presets, and when the
load drops they come back to the faithful one.

Inputs, all from ``presets.yaml`` (supernet.presets, written by ``supernet place search``):

* quality: each preset's ``measured_quality`` (the file's weighted metric, higher is better). "Most faithful"
  means highest measured quality; ``min_quality`` is a floor in the same units.
* cost: ``1 / speedup`` per output token, relative to all-FA (``speedup`` is the file's cost model's).

Presets lacking either number are not candidates. The latency model (``LatencyModel``) is deliberately simple:
the engine runs one decode step for every sequence in flight whatever its preset, so every sequence's
per-token latency is the step time, modelled as

    step seconds = w * (shared + sum over the sequences in flight of cost(their preset))

``shared`` is the per-step work every batch pays whatever its presets (MLP weights, LM head, scheduling), in
units of one all-FA sequence (default 1). ``w`` (seconds per unit) is not configured but measured: every gap
between two outputs of a running request, per token, divided by ``shared + load`` at that moment, feeds an
exponential moving average. Errors in the cost model's absolute scale are thus absorbed by ``w``; only its
ratios between presets matter. Before the first measurement every request gets the most faithful preset.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from serving.presets import PresetTable
from serving.types import OutputStream, RequestOutput


class AutoPresetError(ValueError):
    """An auto-preset setting that cannot work with these presets; the message names the bad value."""


@dataclass(frozen=True)
class AutoConfig:
    latency_target_ms: float = 100.0  # per output token (10 tokens/s, faster than anyone reads)
    min_quality: float | None = None  # presets.yaml's measured_quality units; None: every candidate
    shared_cost: float = 1.0  # per-step work independent of the presets, in all-FA sequences
    smoothing: float = 0.2  # weight of a new measurement in the moving average of w

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_target_ms) and self.latency_target_ms > 0):
            raise AutoPresetError(f"--latency-target-ms {self.latency_target_ms}: must be a number > 0")
        if self.min_quality is not None and not math.isfinite(self.min_quality):
            raise AutoPresetError(f"--min-quality {self.min_quality}: must be a finite number")
        if not (math.isfinite(self.shared_cost) and self.shared_cost >= 0):
            raise AutoPresetError(f"shared cost {self.shared_cost}: must be >= 0")
        if not 0 < self.smoothing <= 1:
            raise AutoPresetError(f"smoothing {self.smoothing}: must be in (0, 1]")


@dataclass(frozen=True)
class Candidate:
    name: str
    quality: float
    cost: float  # per output token relative to all-FA (1 / speedup)


@dataclass(frozen=True)
class AutoChoice:
    preset: str
    predicted_s: float | None  # predicted seconds per output token (None before any measurement)
    meets_target: bool  # False: no candidate met the target, this is the fastest one within the floor


class LatencyModel:
    """``step = w * (shared + load)``, with ``w`` a moving average of measured gaps (module docstring)."""

    def __init__(self, shared: float = 1.0, smoothing: float = 0.2) -> None:
        self.shared = shared
        self.smoothing = smoothing
        self.w: float | None = None  # seconds per cost unit

    def observe(self, seconds_per_token: float, load: float) -> None:
        """A measured per-token gap while ``load`` (summed cost of the sequences in flight) was running."""
        units = self.shared + load
        if units <= 0 or not math.isfinite(seconds_per_token) or seconds_per_token < 0:
            return
        sample = seconds_per_token / units
        self.w = sample if self.w is None else self.w + self.smoothing * (sample - self.w)

    def predict(self, load: float) -> float | None:
        """Seconds per output token with ``load`` in flight (None until something was measured)."""
        return None if self.w is None else self.w * (self.shared + load)


class AutoPresetPolicy:
    """Candidates ordered most faithful first; ``choose`` walks them and takes the first that meets the target."""

    def __init__(self, candidates: list[Candidate], config: AutoConfig | None = None) -> None:
        self.config = config or AutoConfig()
        if not candidates:
            raise AutoPresetError("the auto preset needs at least one candidate preset")
        floor = self.config.min_quality
        eligible = [c for c in candidates if floor is None or c.quality >= floor]
        if not eligible:
            best = max(candidates, key=lambda c: c.quality)
            raise AutoPresetError(
                f"--min-quality {floor}: no preset reaches it (the best, {best.name!r}, measured "
                f"{best.quality:.4g}; qualities range {min(c.quality for c in candidates):.4g} .. "
                f"{best.quality:.4g})"
            )
        # most faithful first; equal quality: the cheaper one first (it dominates)
        self.candidates = sorted(eligible, key=lambda c: (-c.quality, c.cost))
        self.fastest = min(self.candidates, key=lambda c: (c.cost, -c.quality))
        self.cost = {c.name: c.cost for c in candidates}
        self.model = LatencyModel(self.config.shared_cost, self.config.smoothing)

    @classmethod
    def from_presets(cls, presets: PresetTable, config: AutoConfig | None = None) -> AutoPresetPolicy:
        candidates = [
            Candidate(p.name, p.quality, 1.0 / p.speedup)
            for p in presets.presets.values()
            if p.quality is not None and p.speedup is not None and p.speedup > 0
        ]
        if not candidates:
            raise AutoPresetError(
                f"the auto preset needs presets with measured_quality and speedup (as `supernet place search` "
                f"writes them to presets.yaml); the presets from {presets.source} have none"
            )
        return cls(candidates, config)

    def cost_of(self, preset: str) -> float:
        """Per-token cost of a preset in the load sum; presets without a speed-up (and custom placements) count
        as all-FA, the conservative guess."""
        return self.cost.get(preset, 1.0)

    def choose(self, load: float, rows: int = 1) -> AutoChoice:
        """The most faithful candidate whose predicted latency with ``rows`` more sequences on it, on top of
        ``load``, meets the target; else the fastest candidate (the floor is never crossed)."""
        target = self.config.latency_target_ms / 1000
        for c in self.candidates:
            predicted = self.model.predict(load + rows * c.cost)
            if predicted is None or predicted <= target:
                return AutoChoice(c.name, predicted, True)
        return AutoChoice(self.fastest.name, self.model.predict(load + rows * self.fastest.cost), False)


class LoadTracker:
    """Sequences in flight on this server (every request, whatever its preset) and their summed cost; measures
    per-token gaps on the outputs as the HTTP layer reads them, and feeds them to the policy's model."""

    def __init__(self, policy: AutoPresetPolicy) -> None:
        self.policy = policy
        self.load = 0.0  # summed cost of the sequences in flight
        self.rows = 0

    def track(self, stream: OutputStream, preset: str, rows: int) -> TrackedStream:
        return TrackedStream(stream, self, rows * self.policy.cost_of(preset), rows)


@dataclass
class TrackedStream:
    """An engine output stream that counts in the load from submission until it ends or is aborted."""

    stream: OutputStream
    tracker: LoadTracker
    cost: float
    rows: int
    last: float | None = None
    released: bool = field(default=False)

    def __post_init__(self) -> None:
        self.tracker.load += self.cost
        self.tracker.rows += self.rows

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.stream:
                tokens = max((len(d.token_ids) for d in out.deltas), default=0)
                if tokens:
                    now = time.monotonic()
                    if self.last is not None:  # the first output includes the prefill: not a decode gap
                        self.tracker.policy.model.observe((now - self.last) / tokens, self.tracker.load)
                    self.last = now
                yield out
                if out.finished:
                    break
        finally:
            self._release()

    def abort(self) -> None:
        self._release()
        self.stream.abort()

    def _release(self) -> None:
        if not self.released:
            self.released = True
            self.tracker.load = max(0.0, self.tracker.load - self.cost)
            self.tracker.rows -= self.rows


class AutoPreset:
    """What the server holds: the policy, the load tracker, and the /metrics counters (on the server's
    prometheus registry, beside serving.metrics)."""

    def __init__(self, policy: AutoPresetPolicy, registry: Any = None) -> None:
        self.policy = policy
        self.tracker = LoadTracker(policy)
        self.choices: Any = None
        self.predicted: Any = None
        if registry is not None:
            from prometheus_client import Counter, Gauge

            self.choices = Counter(
                "supernet_auto_preset_choices", "Requests for the auto preset, by the preset chosen", ["preset"],
                registry=registry,
            )
            self.predicted = Gauge(
                "supernet_auto_preset_predicted_seconds_per_token",
                "Predicted per-token latency of the auto preset's latest choice",
                registry=registry,
            )
            for c in policy.candidates:  # every candidate shows up at 0, so dashboards see the whole mix
                self.choices.labels(c.name)

    def choose(self, rows: int = 1) -> AutoChoice:
        choice = self.policy.choose(self.tracker.load, rows)
        if self.choices is not None:
            self.choices.labels(choice.preset).inc()
            if choice.predicted_s is not None:
                self.predicted.set(choice.predicted_s)
        return choice

    def track(self, stream: OutputStream, preset: str, rows: int) -> TrackedStream:
        return self.tracker.track(stream, preset, rows)
