"""Chunked (WY / UT) form of GDN and KDA for prefill and training.

The sequence is cut into chunks of ``C`` tokens. Inside a chunk, with ``G_t`` the cumulative log-decay from
the chunk start (per head for GDN, per key channel for KDA) and ``S0`` the state entering the chunk, the
delta-rule writes ``u_t`` satisfy a unit-lower-triangular system::

    u_t + beta_t * sum_{s<t} A_ts u_s = beta_t * (v_t - S0^T (exp(G_t) * k_t)),
    A_ts = sum_d k_t,d k_s,d exp(G_t,d - G_s,d)

so ``U = Wv - Wk S0`` where ``[Wv | Wk] = (I + diag(beta) A)^-1 diag(beta) [V | exp(G) * K]`` (one batched
triangular solve for all chunks at once). Outputs and the next state are then linear in ``S0``::

    O      = (exp(G) * Q - Aqk Wk) S0 + Aqk Wv                      (Aqk: same as A, q on the left, t >= s)
    S_next = (diag(exp(G_C)) - Kc^T Wk) S0 + Kc^T Wv = M S0 + Bm     (Kc = exp(G_C - G) * K)

Everything except ``S_next = M S0 + Bm`` is computed for all chunks in parallel; the scan over chunks is one
``[K, K] @ [K, V]`` matmul per chunk, and the outputs are read back from the stacked chunk-entry states with
one more batched matmul. All state math is fp32; every op is plain PyTorch, so autograd differentiates it.

Stability: every exponent is a *difference* ``G_later - G_earlier <= 0`` (g <= 0), so no ``exp`` of a
large positive number is ever formed. For GDN the ``C x C`` decay matrix is masked before the ``exp``.
For KDA the decay is per channel, so ``A`` cannot be a plain matmul of pre-scaled q/k without a reference
point; we use sub-chunks of ``c`` tokens (see :func:`_intra_kda`): blocks below the diagonal factor through
the boundary of the row's sub-chunk (both factors <= 1), and the small diagonal blocks are computed exactly
in log space as ``[c, c, K]`` tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import fla
from kernels.delta_rule.utils import VarlenLayout, check_inputs

__all__ = ["chunk_gated_delta_rule", "chunk_kda", "chunk_delta_rule"]


def _to_chunks(x: Tensor, chunk: int) -> Tensor:
    """``[B, T, H, *rest] -> [B, H, NT, C, *rest]`` in fp32, zero-padded at the end (zeros are identity steps)."""
    x = x.to(torch.float32).transpose(1, 2)
    T = x.shape[2]
    pad = (-T) % chunk
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], -1, chunk, *x.shape[3:])


def _intra_gdn(q: Tensor, k: Tensor, gc: Tensor) -> tuple[Tensor, Tensor]:
    """Within-chunk ``Aqk`` (t >= s) and ``Akk`` (t > s) for a scalar decay per head.

    ``gc [.., C]``: the pairwise decay ``exp(G_t - G_s)`` is only ``C x C`` per chunk, so it is formed
    directly, with the upper triangle masked to ``-inf`` *before* the exp.
    """
    C = gc.shape[-1]
    upper = torch.ones(C, C, dtype=torch.bool, device=gc.device).triu(1)
    decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(upper, float("-inf")).exp()
    a = torch.cat([q, k], dim=-2) @ k.transpose(-1, -2)  # [.., 2C, C]: q.k and k.k in one matmul
    aqk = a[..., :C, :] * decay
    akk = a[..., C:, :] * decay
    return aqk, akk


def _intra_kda(q: Tensor, k: Tensor, gc: Tensor, sub: int) -> tuple[Tensor, Tensor]:
    """Within-chunk ``Aqk`` / ``Akk`` for a per-channel decay, ``gc [.., C, K]``, using sub-chunks of ``sub``.

    ``exp(G_t - G_s)`` cannot be split as ``exp(G_t) * exp(-G_s)``: ``G`` reaches -300 within a chunk for
    fast channels and ``exp(300)`` overflows. Instead, for row sub-chunk ``i`` we pick the reference
    ``r = G`` at the last token of sub-chunk ``i - 1``; every earlier column ``s`` has ``G_s >= r`` and every
    row ``t`` has ``G_t <= r``, so ``exp(G_t - r)`` and ``exp(r - G_s)`` are both in ``(0, 1]`` and their
    product is exact. The ``sub x sub`` blocks on the diagonal have no such reference point and are
    computed exactly as ``[sub, sub, K]`` log-space differences (masked before the exp); they cost
    ``C * sub * K`` per chunk, which is why ``sub`` is small.
    """
    *lead, C, K = gc.shape
    ns = C // sub
    gs = gc.unflatten(-2, (ns, sub))  # [.., ns, c, K]
    qs = q.unflatten(-2, (ns, sub))
    ks = k.unflatten(-2, (ns, sub))

    # Diagonal blocks, exact: E[t, s, d] = exp(G_t,d - G_s,d) k_s,d for t >= s.
    upper = torch.ones(sub, sub, dtype=torch.bool, device=gc.device).triu(1)[..., None]
    e = (gs[..., :, None, :] - gs[..., None, :, :]).masked_fill(upper, float("-inf")).exp()
    e = e * ks[..., None, :, :]  # [.., ns, c(t), c(s), K]
    diag = e @ torch.stack([qs, ks], dim=-1)  # [.., ns, c(t), c(s), 2]
    eye_blocks = torch.eye(ns, dtype=gc.dtype, device=gc.device)[:, None, :, None]  # [ns, 1, ns, 1]
    diag_q = (diag[..., 0].unsqueeze(-2) * eye_blocks).reshape(*lead, C, C)
    diag_k = (diag[..., 1].unsqueeze(-2) * eye_blocks).reshape(*lead, C, C)
    if ns == 1:
        return diag_q, diag_k

    # Blocks below the diagonal: row sub-chunk i >= 1 against columns s < i * sub, through reference r_i.
    ref = gs[..., :-1, -1, :]  # [.., ns-1, K]
    left = (gs[..., 1:, :, :] - ref[..., None, :]).exp()  # <= 1
    lhs = torch.cat([qs[..., 1:, :, :] * left, ks[..., 1:, :, :] * left], dim=-2)  # [.., ns-1, 2c, K]
    P = C - sub  # columns any row block can see below the diagonal
    # Columns past the row block's own start get a positive exponent; clamp them (they are masked next).
    right = (ref[..., :, None, :] - gc[..., None, :P, :]).clamp(max=0).exp()  # [.., ns-1, P, K]
    rhs = k[..., None, :P, :] * right
    off = lhs @ rhs.transpose(-1, -2)  # [.., ns-1, 2c, P]
    row_block = torch.arange(1, ns, device=gc.device)[:, None]
    seen = torch.arange(P, device=gc.device)[None, :] < row_block * sub  # [ns-1, P]
    off = off * seen[:, None, :].to(off.dtype)
    off = F.pad(off, (0, C - P, 0, 0))  # [.., ns-1, 2c, C]
    zero_row = off.new_zeros(*lead, 1, sub, C)
    off_q = torch.cat([zero_row, off[..., :sub, :]], dim=-3).reshape(*lead, C, C)
    off_k = torch.cat([zero_row, off[..., sub:, :]], dim=-3).reshape(*lead, C, C)
    return diag_q + off_q, diag_k + off_k


def _sub_chunk(chunk: int, limit: int = 16) -> int:
    """Largest divisor of ``chunk`` not above ``limit`` (the KDA diagonal-block size)."""
    return max(d for d in range(1, min(chunk, limit) + 1) if chunk % d == 0)


def chunk_delta_rule(
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
    chunk_size: int = 64,
    sub_chunk: int = 16,
) -> tuple[Tensor, Tensor | None]:
    """Pure-PyTorch chunked delta rule: ``g`` ``[B, T, H]`` gives GDN, ``[B, T, H, K]`` gives KDA.

    ``sub_chunk`` (KDA only) is the size of the exactly-computed diagonal blocks. Short inputs use a chunk
    no longer than needed (rounded up to 16), which changes nothing mathematically.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    per_channel = g.dim() == 4
    layout = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError("cu_seqlens requires inputs packed as B == 1")
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        C = min(chunk_size, max(16, -(-longest // 16) * 16))
        layout = VarlenLayout(cu_seqlens, T, k.device, multiple=C)
        q, k, v, g, beta = (layout.pad(x) for x in (q, k, v, g, beta))
    else:
        C = min(chunk_size, max(16, -(-T // 16) * 16))
    N, L = k.shape[:2]

    q, k, v, g, beta = (_to_chunks(x, C) for x in (q, k, v, g, beta))  # [N, H, NT, C, *]
    q = q * scale
    NT = q.shape[2]
    gc = g.cumsum(dim=3)  # within-chunk cumulative log-decay, <= 0 and non-increasing
    if per_channel:
        aqk, akk = _intra_kda(q, k, gc, _sub_chunk(C, sub_chunk))
        g_last = gc[..., -1, :]  # [.., K]
    else:
        aqk, akk = _intra_gdn(q, k, gc)
        gc = gc[..., None]  # [.., C, 1]: broadcasts over key channels from here on
        g_last = gc[..., -1, :]  # [.., 1]
    gamma = gc.exp()  # decay from chunk start to t
    tail = (g_last[..., None, :] - gc).exp()  # decay from t to chunk end

    # WY / UT transform: [Wv | Wk] = (I + diag(beta) Akk)^-1 diag(beta) [V | exp(G) K].
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    system = beta[..., None] * akk * strict
    rhs = beta[..., None] * torch.cat([v, k * gamma], dim=-1)
    w = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # [.., C, V+K]

    # Chunk transition S_next = M S + Bm and the two pieces of the output, for all chunks at once.
    kw = (k * tail).transpose(-1, -2) @ w  # [.., K, V+K]
    eye = torch.eye(K, dtype=q.dtype, device=q.device)
    trans = g_last.exp()[..., None] * eye - kw[..., V:]  # [.., K, K]
    bias = kw[..., :V]  # [.., K, V]
    qw = aqk @ w  # [.., C, V+K]
    q_state = q * gamma - qw[..., V:]  # what each token reads from the chunk-entry state
    o_intra = qw[..., :V]

    # Sequential scan over chunks: one [K, K] @ [K, V] per chunk, batched over sequences and heads.
    if initial_state is None:
        S = q.new_zeros(N, H, K, V)
    else:
        S = initial_state.to(torch.float32)
    trans = trans.permute(2, 0, 1, 3, 4).reshape(NT, N * H, K, K)
    bias = bias.permute(2, 0, 1, 3, 4).reshape(NT, N * H, K, V)
    S = S.reshape(N * H, K, V)
    entry = []
    for n in range(NT):
        entry.append(S)
        S = torch.baddbmm(bias[n], trans[n], S)
    states = torch.stack(entry, dim=1).reshape(N, H, NT, K, V)
    o = q_state @ states + o_intra  # [N, H, NT, C, V]

    o = o.reshape(N, H, NT * C, V)[:, :, :L].transpose(1, 2)
    if layout is not None:
        o = layout.unpad(o)
    final = S.reshape(N, H, K, V) if output_final_state else None
    return o.to(v.dtype), final


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Gated DeltaNet, chunked form (prefill / training). ``g`` is the per-head log-decay ``[B, T, H]`` (<= 0).

    Args:
        q, k: ``[B, T, H, K]``, already L2-normalised by the caller.
        v: ``[B, T, H, V]``.
        beta: ``[B, T, H]`` write strength in (0, 1).
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (any float dtype, used as fp32); zeros when omitted.
        output_final_state: return the state after the last token.
        cu_seqlens: ``[N + 1]`` cumulative lengths for sequences packed as ``B == 1``.
        chunk_size: tokens per chunk (any value works; 64 balances the O(C^2) intra work against the scan).

    Returns:
        ``(o [B, T, H, V] in v.dtype, final_state [N, H, K, V] fp32 or None)``. On CUDA with ``fla``
        installed this routes to fla's ``chunk_gated_delta_rule`` (untested here).
    """
    check_inputs(q, k, v, g, beta, per_channel=False)
    if fla.use_fla(q):
        return fla.call("chunk_gdn", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )


def chunk_kda(
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
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Kimi Delta Attention, chunked form. ``g`` is the per-channel log-decay ``[B, T, H, K]`` (<= 0).

    Same contract as :func:`chunk_gated_delta_rule`; on CUDA with ``fla`` installed this routes to fla's
    ``chunk_kda`` (untested here).
    """
    check_inputs(q, k, v, g, beta, per_channel=True)
    if fla.use_fla(q):
        return fla.call("chunk_kda", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size,
    )
