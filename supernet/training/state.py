"""Resumable training checkpoints: trainable weights, optimiser, schedule position, data position and RNG.

Layout of ``<run>/checkpoints/``::

    step-000050/          params.safetensors, optim.safetensors (CRC32 per tensor), state.json (written last)
    latest                the name of the newest complete checkpoint

A checkpoint is assembled in ``step-000050.tmp/`` (every file fsynced) and only then renamed into place, and
``latest`` is replaced atomically after that rename: a run killed at any instant leaves either the previous
checkpoint or the new one, never a half-written directory that a resume could pick up (``*.tmp`` directories
are ignored and swept). Everything is safetensors + JSON; nothing is pickled."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from supernet.checkpoint import CheckpointError, _crc

LATEST = "latest"


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", "crc32": json.dumps({k: _crc(v) for k, v in tensors.items()}, sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _read(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """One safetensors file of a checkpoint, every tensor checked against its stored CRC32."""
    from safetensors import SafetensorError, safe_open

    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as fh:
            crcs = json.loads((fh.metadata() or {}).get("crc32", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable, probably truncated or corrupt ({err})") from err
    for key, tensor in tensors.items():
        if key in crcs and _crc(tensor) != crcs[key]:
            raise CheckpointError(f"{path}: tensor {key!r} fails its checksum (corrupt file)")
    return tensors


def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer | dict[str, Any],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimiser (or its ``state_dict()``, e.g. one gathered from FSDP2 shards) as flat tensors + groups."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            # 0-dim tensors (Adam's step) are stored with one element and a marker, restored on load.
            tensors[f"{idx}.{key}" + ("#scalar" if value.dim() == 0 else "")] = (
                value.reshape(-1) if value.dim() == 0 else value
            )
    return tensors, sd["param_groups"]


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        if key.endswith("#scalar"):
            key, value = key[: -len("#scalar")], value.reshape(())
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": groups}


def save_training_state(
    run_dir: Path,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    state: dict[str, Any],
    keep_last: int = 2,
    tag: str = "",
) -> Path:
    """Write one checkpoint atomically. ``tag`` distinguishes checkpoints of the same step (the warm start's
    chunks, all at step 0): names sort in training order, so a new one never replaces an old one in place."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}" + (f"-{tag}" if tag else "")
    tmp = ckpt_root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_tensors(tmp / "params.safetensors", params)
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        tensors, groups = optimizer_to_tensors(optimizer)
        _write_tensors(tmp / "optim.safetensors", tensors)
    rng = torch.get_rng_state()
    _write_tensors(tmp / "rng.safetensors", {"torch": rng})
    (tmp / "state.json").write_text(
        json.dumps(
            {**state, "step": step, "optimizer_groups": groups, "has_optimizer": optimizer is not None},
            indent=2,
        )
    )
    _fsync(tmp / "state.json")
    final = ckpt_root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = ckpt_root / (LATEST + ".tmp")
    pointer.write_text(name + "\n")
    _fsync(pointer)
    pointer.replace(ckpt_root / LATEST)
    for old in complete_checkpoints(run_dir)[max(1, keep_last):]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first (a directory counts only once renamed from .tmp with its
    state.json)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.glob("step-*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "state.json").is_file()
    ]
    return sorted(found, reverse=True)


def load_training_state(
    directory: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any], torch.Tensor]:
    """(params, optimizer tensors or None, state.json, torch RNG state) of one checkpoint; CheckpointError if
    any part is unreadable or fails its checksum."""
    try:
        state = json.loads((directory / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{directory}/state.json: unreadable ({err})") from err
    params = _read(directory, "params.safetensors")
    optim = _read(directory, "optim.safetensors") if state.get("has_optimizer") else None
    rng = _read(directory, "rng.safetensors")["torch"]
    return params, optim, state, rng


__all__ = [
    "CheckpointError",
    "complete_checkpoints",
    "load_training_state",
    "optimizer_from_tensors",
    "save_training_state",
]
