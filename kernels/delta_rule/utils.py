"""Shared plumbing for the delta-rule ops: one public signature, argument checks, fla routing, and the
varlen <-> padded-batch layout.

Every form (naive reference, chunked, recurrent) has the same contract, fla's: ``q, k [B, T, H, K]``,
``v [B, T, H, V]``, ``g`` the log-decay (``[B, T, H]`` for GDN, ``[B, T, H, K]`` for KDA), ``beta [B, T, H]``,
then ``scale``, ``initial_state [N, H, K, V]``, ``output_final_state`` and ``cu_seqlens [N + 1]`` by keyword.
:func:`delta_rule_op` builds each public op from a form's implementation, so that signature, the input
checks and the routing to fla's Triton kernels are written once; the implementations receive a checked
:class:`DeltaRuleInputs`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec

import torch
from torch import Tensor

from kernels import fla

DeltaRuleOutput = tuple[Tensor, Tensor | None]
"""``(o [B, T, H, V] in v.dtype, final_state [N, H, K, V] fp32 or None)``."""

_P = ParamSpec("_P")


@dataclass(frozen=True)
class DeltaRuleInputs:
    """The arguments every delta-rule form takes, checked, with the default ``scale`` (``K ** -0.5``) filled."""

    q: Tensor
    k: Tensor
    v: Tensor
    g: Tensor
    beta: Tensor
    scale: float
    initial_state: Tensor | None
    output_final_state: bool
    cu_seqlens: Tensor | None

    @property
    def per_channel(self) -> bool:
        """KDA (one log-decay per key channel) rather than GDN (one per head)."""
        return self.g.dim() == 4

    @property
    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(q, k, v, g, beta)``: the per-token inputs, which share the ``[B, T, H]`` leading dims."""
        return self.q, self.k, self.v, self.g, self.beta


def fp32_scan(
    fn: Callable[Concatenate[DeltaRuleInputs, _P], DeltaRuleOutput],
) -> Callable[Concatenate[DeltaRuleInputs, _P], DeltaRuleOutput]:
    """Run a delta-rule scan with autocast off, so its state accumulates in fp32 even inside a bf16 autocast
    region (training's ``run.autocast``), where every matmul would otherwise round to bf16. The scans cast
    their inputs to fp32 themselves and return the input dtype."""

    @functools.wraps(fn)
    def scan(x: DeltaRuleInputs, *args: _P.args, **kwargs: _P.kwargs) -> DeltaRuleOutput:
        with torch.autocast(x.q.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return scan


def check_inputs(x: DeltaRuleInputs, per_channel: bool) -> None:
    """Fail early with a readable message instead of a broadcasting error deep inside the kernel."""
    q, k, v, g, beta = x.tensors
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] matching k's [B, T, H], got {tuple(v.shape)}")
    if beta.shape != k.shape[:3]:
        raise ValueError(f"beta must be [B, T, H], got {tuple(beta.shape)}")
    want = k.shape if per_channel else k.shape[:3]
    if g.shape != want:
        raise ValueError(f"g must be {list(want)} (log-decay), got {tuple(g.shape)}")
    if x.initial_state is not None:
        B, _, H, K = k.shape
        n = B if x.cu_seqlens is None else x.cu_seqlens.numel() - 1
        if tuple(x.initial_state.shape) != (n, H, K, v.shape[-1]):
            raise ValueError(f"initial_state must be [N={n}, H={H}, K={K}, V={v.shape[-1]}], "
                             f"got {tuple(x.initial_state.shape)}")


def delta_rule_op(
    impl: Callable[..., DeltaRuleOutput],
    *,
    name: str,
    doc: str,
    per_channel: bool | None = None,
    fla_op: str | None = None,
) -> Callable[..., DeltaRuleOutput]:
    """Build a public delta-rule op with fla's signature from the form ``impl(inputs, **options)``.

    ``per_channel`` fixes the rule the op accepts (``None``: either, chosen by ``g``'s shape, as the naive
    reference does); ``fla_op`` names the :mod:`kernels.fla` op that CUDA inputs route to when ``fla``
    imports (untested here). Extra keywords (``chunk_size``) go to ``impl`` unchanged.
    """

    def op(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g: Tensor,
        beta: Tensor,
        *,
        scale: float | None = None,
        initial_state: Tensor | None = None,
        output_final_state: bool = False,
        cu_seqlens: Tensor | None = None,
        **options: Any,
    ) -> DeltaRuleOutput:
        x = DeltaRuleInputs(
            q, k, v, g, beta, k.shape[-1] ** -0.5 if scale is None else scale,
            initial_state, output_final_state, cu_seqlens,
        )
        check_inputs(x, g.dim() == 4 if per_channel is None else per_channel)
        if fla_op is not None and fla.use_fla(q):
            return fla.call(fla_op, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
        if cu_seqlens is not None and k.shape[0] != 1:
            raise ValueError("cu_seqlens requires inputs packed as B == 1")
        return impl(x, **options)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = doc
    op.__module__ = impl.__module__
    return op


class VarlenLayout:
    """Maps a packed ``[1, T_total, ...]`` batch (fla's ``cu_seqlens``) to a padded one and back.

    Padding positions are filled with zeros. For the delta rule a zero step (k = 0, beta = 0, g = 0) is an
    exact identity on the state (no decay, no write), so padding at the end of a sequence leaves its final
    state untouched and the padded tensors can run through the dense kernels unchanged.

    * ``flat=False``: one row per sequence, ``[N, L, ...]`` with ``L`` the longest length rounded up to
      ``multiple``; sequences are batched, which suits similar lengths (and decode: N x 1 token).
    * ``flat=True``: one row ``[1, P, ...]``, each sequence padded to whole chunks of ``multiple`` and laid
      end to end; no padding to the longest, so very uneven lengths cost only what they hold. The chunk
      scan must then restart at every sequence: ``segments[i] = (first chunk, number of chunks)``.
    """

    def __init__(
        self, cu_seqlens: Tensor, total: int, device: torch.device, multiple: int = 1, flat: bool = False
    ) -> None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor [N + 1]")
        if int(cu[-1]) != total or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to T={total}, got {cu.tolist()}")
        lens = cu[1:] - cu[:-1]
        self.n = lens.numel()
        self.segments: list[tuple[int, int]] | None = None
        if not flat:
            longest = int(lens.max())
            self.length = max(multiple, -(-longest // multiple) * multiple)
            col = torch.arange(self.length, device=device)
            self.valid = col[None, :] < lens[:, None]  # [N, L]
            # Padding slots point at row `total`, a zero row appended by `pad`.
            self.index = torch.where(self.valid, cu[:-1, None] + col[None, :], total)  # [N, L]
            return
        chunks = (lens + multiple - 1) // multiple
        first = torch.cumsum(chunks, 0) - chunks
        self.segments = list(zip(first.tolist(), chunks.tolist(), strict=True))
        self.length = int(chunks.sum()) * multiple
        seq = torch.repeat_interleave(torch.arange(self.n, device=device), lens)  # sequence of each token
        slot = first[seq] * multiple + torch.arange(total, device=device) - cu[seq]  # its padded position
        tokens = torch.arange(total, device=device)
        self.index = torch.full((self.length,), total, device=device).scatter(0, slot, tokens)[None]
        self.valid = torch.zeros(self.length, dtype=torch.bool, device=device).scatter(0, slot, True)[None]

    def pad(self, x: Tensor) -> Tensor:
        """``[1, T, *rest] -> [rows, L, *rest]`` with zeros in padding slots (differentiable gather)."""
        flat = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])], dim=0)
        return flat[self.index]

    def unpad(self, x: Tensor) -> Tensor:
        """``[rows, L, *rest] -> [1, T, *rest]`` keeping only real tokens, in sequence order."""
        return x[self.valid].unsqueeze(0)
