"""``--device`` and ``--dtype``: one parser for every command (serve, generate, eval, train, place).

``cpu`` is the default and the path the tests prove. On ``cuda`` the model, its caches (supernet.cache, which
allocate on the model's device: KV caches in the model's dtype, GDN/KDA recurrent state always fp32) and the
flash-linear-attention kernels (kernels/fla.py, when importable) run on the GPU; that path is untested on the
CPU-only machines this project is developed on.

``auto`` dtype means float32 on CPU (exact reference numerics, what the tests pin) and bfloat16 on CUDA (what
GPUs serve in). ``--dtype bf16`` on a CPU whose oneDNN has bf16 kernels (AVX512-BF16 or AMX) decodes faster:
the linear layers run on packed bf16 weights, half the bytes (kernels/linear.py; docs/benchmarks.md has the
side-by-side figures of ``benchmarks/bench_decode.py --dtype``); GDN/KDA recurrent states stay fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # torch is imported in the bodies: the CLI modules import this one and `--help` stays fast
    import torch

# accepted spelling -> torch attribute
DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

# the options every command shares (typer); parse them with ``resolve``
DeviceOpt = Annotated[str, typer.Option(help="cpu (default), cuda or cuda:N")]
DtypeOpt = Annotated[
    str, typer.Option(help="auto (float32 on cpu, bfloat16 on cuda), float32/fp32, bfloat16/bf16, float16/fp16")
]


class DeviceError(ValueError):
    """A device or dtype string that cannot be used here; the message names the value."""


def parse_device(spec: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA must be available (a CPU-only torch says so here, not mid-load)."""
    import torch

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
    import torch

    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return getattr(torch, DTYPES[spec.lower()])
    except KeyError:
        raise DeviceError(f"--dtype {spec!r}: expected auto, {', '.join(DTYPES)}") from None


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Both options at once, device first (``auto`` depends on it)."""
    parsed = parse_device(device)
    return parsed, parse_dtype(dtype, parsed)
