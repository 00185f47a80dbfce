"""``--device`` and ``--dtype``: one parser for every command (serve, generate, eval, train, place).

``cpu`` is the default and the path the tests prove. On ``cuda`` the model, its caches (supernet.cache, which
allocate on the model's device: KV caches in the model's dtype, GDN/KDA recurrent state always fp32) and the
flash-linear-attention kernels (kernels/fla.py, when importable) run on the GPU; that path is untested on the
CPU-only machines this project is developed on.

``auto`` dtype means float32 on CPU (exact reference numerics; bf16 matmuls on CPUs without AMX are slower than
fp32) and bfloat16 on CUDA (what GPUs serve in).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class DeviceError(ValueError):
    """A device or dtype string that cannot be used here; the message names the value."""


def parse_device(spec: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA must be available (a CPU-only torch says so here, not mid-load)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {spec!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {spec!r}: only 'cpu' and 'cuda' are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec!r}: CUDA is not available in this torch build or machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def parse_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``, ``float32``/``fp32``, ``bfloat16``/``bf16`` or ``float16``/``fp16``."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[spec.lower()]
    except KeyError:
        raise DeviceError(f"--dtype {spec!r}: expected auto, {', '.join(DTYPES)}") from None


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Both options at once, device first (``auto`` depends on it)."""
    parsed = parse_device(device)
    return parsed, parse_dtype(dtype, parsed)
