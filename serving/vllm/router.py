"""Per-request presets inside one vLLM batch: which preset each batch row runs, known before the forward.

vLLM gives a model no per-request data in ``forward``; but its logits processors are told, before every
forward, which requests joined, left or moved within the persistent batch (``update_state``), with each new
request's ``SamplingParams`` -- whose ``extra_args`` carry the OpenAI ``vllm_xargs``. ``PresetRouter`` is such a
processor: it never changes logits; it keeps ``ROUTING.rows`` (batch row -> preset) up to date, and the model's
mixer op (serving.vllm.layers) expands that to one mixer per token per layer, since vLLM lays tokens out
row by row in that same batch order.

Everything here lives in the worker process that holds the model (one engine per process); the engine-wide
default preset (used by requests that name none) can be switched at run time with ``set_default_preset``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from serving.presets import PresetTable
from supernet.config import MIXER_NAMES

try:  # the router is only meaningful with vLLM installed; the module imports without it for docs/tests
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # pragma: no cover - exercised only without vLLM
    LogitsProcessor = object

log = logging.getLogger("serving.vllm")

ROUTER_FQCN = "serving.vllm.router:PresetRouter"
WORKER_EXTENSION = "serving.vllm.router.RouterWorkerExtension"
_KNOWN: dict[str, None] = {}  # presets an engine built in this process serves (request validation)


def remember_presets(table: PresetTable) -> None:
    """Called where the engine config is built (the API process), so bad preset names fail at admission."""
    _KNOWN.clear()
    _KNOWN.update(dict.fromkeys(table.names))


def requested_preset(params: Any) -> str | None:
    extra = getattr(params, "extra_args", None) or {}
    preset = extra.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"vllm_xargs.preset must be a string, got {preset!r}")
    return preset


class Routing:
    """The served presets as a [presets, layers] table of mixer ids, and the preset of every batch row."""

    def __init__(self) -> None:
        self.table: PresetTable | None = None
        self.ids: dict[str, int] = {}
        self.placements = torch.zeros(0, 0, dtype=torch.long)
        self.default = 0
        self.rows: dict[int, int] = {}

    def configure(self, table: PresetTable) -> None:
        self.table = table
        self.ids = {name: i for i, name in enumerate(table.names)}
        self.placements = torch.tensor(
            [[MIXER_NAMES.index(m) for m in table.get(name).placement] for name in table.names],
            dtype=torch.long,
        )
        self.default = self.ids[table.default]
        self.rows = {}

    def preset_id(self, name: str | None) -> int:
        if name is None:
            return self.default
        if name not in self.ids:
            # validate_params rejects these at admission; reaching here means a path that skipped it
            log.warning("unknown preset %r; using the default %r", name, self.name(self.default))
            return self.default
        return self.ids[name]

    def name(self, preset_id: int) -> str:
        return self.table.names[preset_id] if self.table is not None else "?"

    def set_default(self, name: str) -> None:
        if name not in self.ids:
            raise ValueError(f"unknown preset {name!r}; served: {', '.join(self.ids)}")
        self.default = self.ids[name]

    def token_mixers(self, query_start_loc: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[layers, num_tokens] mixer ids for this step (tokens past the last row: the default preset)."""
        qsl = query_start_loc.to("cpu", torch.long)
        num_rows = qsl.numel() - 1
        rows = torch.tensor([self.rows.get(i, self.default) for i in range(num_rows)], dtype=torch.long)
        per_token = torch.full((num_tokens,), self.default, dtype=torch.long)
        n = int(qsl[-1])
        per_token[:n] = torch.repeat_interleave(rows, qsl.diff())[:num_tokens]
        return self.placements[per_token].T.contiguous()


ROUTING = Routing()


def set_default_preset(name: str) -> str:
    """Engine-wide switch: requests that name no preset run ``name`` from now on. Running requests keep their
    own placement and caches, so nothing is wiped. Returns the previous default."""
    previous = ROUTING.name(ROUTING.default)
    ROUTING.set_default(name)
    return previous


class RouterWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) so ``collective_rpc("set_default_preset", args=(name,))``
    switches the engine-wide default from ``LLM`` / ``AsyncLLM``."""

    def set_default_preset(self, name: str) -> str:
        return set_default_preset(name)


class PresetRouter(LogitsProcessor):
    """Tracks batch row -> preset from ``SamplingParams.extra_args["preset"]``; never changes logits."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        preset = requested_preset(sampling_params)
        if preset is not None and _KNOWN and preset not in _KNOWN:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(_KNOWN)}")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.routing = ROUTING

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rows = self.routing.rows
        for index in batch_update.removed:
            rows.pop(index, None)
        for index, params, _, _ in batch_update.added:
            rows[index] = self.routing.preset_id(requested_preset(params))
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                rows[a], rows[b] = rows.get(b, self.routing.default), rows.get(a, self.routing.default)
            else:
                rows[b] = rows.pop(a, self.routing.default)
