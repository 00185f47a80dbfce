"""Chunked (WY / UT) form of GDN and KDA for prefill and training.

The sequence is cut into chunks of ``C`` tokens. Inside a chunk, with ``G_t`` the cumulative log-decay from
the chunk start (per head for GDN, per key channel for KDA) and ``S0`` the state entering the chunk, the
delta-rule writes ``u_t`` satisfy a unit-lower-triangular system::

    u_t + beta_t * sum_{s<t} A_ts u_s = beta_t * (v_t - S0^T (exp(G_t) * k_t)),
    A_ts = sum_d k_t,d k_s,d exp(G_t,d - G_s,d)

so ``U = Wv - Wk S0`` with ``[Wv | Wk] = (I + diag(beta) A)^-1 diag(beta) [V | exp(G) * K]``, computed for
many chunks at once (block forward substitution, :func:`_unit_lower_solve`). Then::

    O      = exp(G) * Q @ S0 + Aqk @ U                 (Aqk like A with q on the left, t >= s)
    S_next = exp(G_C) * S0 + (exp(G_C - G) * K)^T @ U

The scan over chunks runs only the two ``[C, K] x [K, V]`` matmuls that carry the state (``U`` and
``S_next``), batched over sequences and heads; the outputs are read back for a whole group of chunks at
once from the stacked chunk-entry states and ``U``. (Precomputing a ``[K, K]`` chunk transition so that
the scan is a single matmul measured slower: it costs more FLOPs outside the loop than it saves inside.)
All state math is fp32; every op is plain PyTorch, so autograd differentiates it.

Stability: every exponent is a *difference* ``G_later - G_earlier <= 0`` (g <= 0), so no exp of a large
positive number is ever formed. For GDN the ``C x C`` decay matrix is formed directly. For KDA the decay is
per channel, so ``A`` needs a reference point to become a matmul; :func:`_intra_kda` halves the chunk
recursively and factors each lower-left quadrant through the boundary between its halves.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.delta_rule.utils import DeltaRuleInputs, DeltaRuleOutput, VarlenLayout, delta_rule_op, fp32_scan

__all__ = ["chunk_gated_delta_rule", "chunk_kda", "chunk_delta_rule"]


# Decays are handled in base 2: ``exp2`` is ~3x faster than ``exp`` on CPU (measured here), and converting
# the log-decay once (``g * log2(e)``, before the cumulative sum) costs one rounding, the same as storing
# ``g`` in fp32 in the first place. Exponents are clamped at -120 (2^-120 ~ 7.5e-37, still a normal float):
# subnormal results take a slow path (2-40x slower for exp) and cannot change an fp32 sum of O(1) terms.
_LOG2E = 1.4426950408889634
_MIN_LOG2 = -120.0


def _decay(log2_decay: Tensor) -> Tensor:
    """``2 ** x`` for a base-2 log-decay that is <= 0 by construction; positive (masked) entries become 1."""
    return log2_decay.clamp(_MIN_LOG2, 0.0).exp2()


def _to_chunks(x: Tensor, chunk: int) -> Tensor:
    """``[B, T, H, *rest] -> [NT * B * H, C, *rest]`` in fp32, chunk-major, zero-padded at the end.

    Chunk-major order makes the scan's per-chunk slices contiguous ``[B * H, ...]`` blocks. Zero padding
    (k = 0, beta = 0, g = 0) is an identity step, so it never changes a state.
    """
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    pad = (-T) % chunk
    x = x.to(torch.float32)
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.reshape(B, -1, chunk, H, *rest).transpose(2, 3).transpose(0, 1)  # [NT, B, H, C, *rest]
    return x.reshape(-1, chunk, *rest)


def _intra_gdn(q: Tensor, k: Tensor, gc: Tensor) -> tuple[Tensor, Tensor]:
    """Within-chunk ``Aqk[t, s] = q_t.k_s exp(G_t - G_s)`` (t >= s, zero above) and ``Akk`` (t > s valid).

    ``q, k [X, C, K]``, ``gc [X, C]`` (cumulative log-decay, base 2): with one decay per head the pairwise
    decay is only ``C x C`` per chunk, so it is formed directly and masked.
    """
    C = gc.shape[-1]
    causal = torch.ones(C, C, dtype=gc.dtype, device=gc.device).tril()
    decay = _decay(gc[:, :, None] - gc[:, None, :]) * causal
    kt = k.transpose(1, 2)
    return (q @ kt) * decay, (k @ kt) * decay


@functools.cache
@torch.inference_mode(False)  # cached: an inference tensor made under inference_mode would break autograd later
def _kda_assembly(C: int, device: torch.device) -> Tensor:
    """Gather index that assembles :func:`_intra_kda`'s pieces into ``[2 (q|k), C, C]`` (slot 0 = zero).

    Pieces, in order: each halving level's quadrants ``[M, h(t), 2(q|k), h(s)]``, then either the diagonal
    ``q_t . k_t`` ``[C]`` or, for odd leftover blocks of ``b`` tokens, the exact blocks ``[M, b, b, 2]``.
    Upper-triangle entries map to the zero slot, so ``Aqk`` needs no causal mask. One gather instead of
    in-place writes into views keeps autograd from cloning the full gradient once per level.
    """
    src = torch.zeros(2, C, C, dtype=torch.long)
    offset = 1
    b = C
    while b % 2 == 0:
        h, M = b // 2, C // b
        m, t, qk, s = torch.meshgrid(*(torch.arange(n) for n in (M, h, 2, h)), indexing="ij")
        src[qk, m * b + h + t, m * b + s] = offset + ((m * h + t) * 2 + qk) * h + s
        offset += M * h * 2 * h
        b = h
    if b > 1:
        M = C // b
        m, t, s, qk = torch.meshgrid(*(torch.arange(n) for n in (M, b, b, 2)), indexing="ij")
        keep = t > s - (qk == 0).long()  # q: t >= s, k: t > s
        flat = offset + ((m * b + t) * b + s) * 2 + qk
        src[qk[keep], (m * b + t)[keep], (m * b + s)[keep]] = flat[keep]
    else:
        t = torch.arange(C)
        src[0, t, t] = offset + t
    return src.flatten().to(device)


def _intra_kda(q: Tensor, k: Tensor, gc: Tensor, small: int = 1) -> tuple[Tensor, Tensor]:
    """Within-chunk ``Aqk`` (t >= s, zero above) / ``Akk`` (t > s valid) for a per-channel decay.

    ``q, k, gc: [X, C, K]`` (``gc``: cumulative log-decay, base 2). ``exp(G_t - G_s)`` cannot be split as
    ``exp(G_t) * exp(-G_s)``: ``G`` reaches -300 within a chunk for fast channels; ``exp(300)`` overflows.
    So the chunk is halved recursively: the lower-left quadrant of a block (rows in its second half,
    columns in its first) factors exactly through the reference ``r = G`` at the last token of the first
    half, where ``exp(G_t - r) <= 1`` and ``exp(r - G_s) <= 1``; each quadrant is then one matmul of
    pre-scaled rows and columns. Halving down to single tokens covers the whole strict lower triangle;
    the diagonal (``q_t . k_t``, no decay) is added last. Each level costs O(C K) elementwise work per
    chunk, against O(C * sub * K) for exact ``[sub, sub, K]`` diagonal blocks of a flat split. Quadrants
    of at most ``small`` rows use a broadcast multiply-sum rather than a batched matmul of tiny matrices.
    """
    X, C, K = q.shape
    qk = torch.stack([q, k], dim=2)  # [X, C, 2, K]: a block's q and k rows are adjacent, so one multiply
    pieces = [q.new_zeros(X, 1)]
    b = C
    while b % 2 == 0:
        h, M = b // 2, C // b
        g4, k4 = gc.reshape(X, M, 2, h, K), k.reshape(X, M, 2, h, K)
        ref = g4[:, :, 0, -1:]  # [X, M, 1, K]
        left = _decay(g4[:, :, 1] - ref)
        right = _decay(ref - g4[:, :, 0])
        lhs = qk.view(X, M, 2, h, 2, K)[:, :, 1] * left[:, :, :, None]  # [X, M, h(t), 2(q|k), K]
        rhs = k4[:, :, 0] * right  # [X, M, h(s), K]
        if h <= small:
            blk = (lhs[:, :, :, :, None, :] * rhs[:, :, None, None, :, :]).sum(-1)
        else:
            blk = lhs.reshape(X * M, 2 * h, K) @ rhs.reshape(X * M, h, K).transpose(1, 2)
        pieces.append(blk.reshape(X, -1))  # [X, M * h * 2 * h]
        b = h
    if b > 1:  # odd block sizes left over (chunk sizes that are not powers of two): exact, in log space
        M = C // b
        g4, q4, k4 = (x.reshape(X, M, b, K) for x in (gc, q, k))
        e = _decay(g4[:, :, :, None] - g4[:, :, None, :]) * k4[:, :, None]  # [X, M, t, s, K]
        pieces.append((e @ torch.stack([q4, k4], dim=-1)).reshape(X, -1))  # [X, M * t * s * 2]
    else:
        pieces.append((q * k).sum(-1))
    a = torch.cat(pieces, dim=1).index_select(1, _kda_assembly(C, q.device)).view(X, 2, C, C)
    return a[:, 0], a[:, 1]


def _unit_lower_solve(a: Tensor, r: Tensor, block: int = 32) -> Tensor:
    """``(I + tril(a, -1))^-1 r`` for ``a [X, C, C]``, ``r [X, C, N]``: forward substitution over blocks.

    The diagonal ``block x block`` systems are inverted all at once (one small batched triangular solve
    against the identity), then block rows are substituted in order with matmuls. Only the strictly lower
    triangle of ``a`` is read. Measured ~2x faster than ``torch.linalg.solve_triangular`` on the full
    ``[C, C]`` systems (batched 64x64 trsm runs far below matmul speed; with 128 right-hand sides it can
    be much slower still), and on par with forming the full inverse by recursive blocking.
    """
    X, C, _ = a.shape
    if C % block:
        block = C
    nb = C // block
    eye = torch.eye(block, dtype=a.dtype, device=a.device)
    diag = a.view(X, nb, block, nb, block).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [X, nb, b, b]
    inv = torch.linalg.solve_triangular(diag + eye, eye.expand_as(diag), upper=False, unitriangular=True)
    out: list[Tensor] = []
    for i in range(nb):
        rows = slice(i * block, (i + 1) * block)
        rhs = r[:, rows]
        if i:
            rhs = rhs - a[:, rows, : i * block] @ torch.cat(out, dim=1)
        out.append(inv[:, i] @ rhs)
    return torch.cat(out, dim=1)


_GROUP_ROWS = 96


class _Scan:
    """The state carried across chunks (and groups of chunks), with varlen restarts.

    Without a flat varlen layout the state is ``[NH, K, V]`` for all sequences and heads at once. With one
    (``segments[i] = (first chunk, number of chunks)``), sequences lie end to end: the state restarts from
    sequence i's entry state at its first chunk, and its final state is taken after its last chunk.
    """

    def __init__(self, h0: Tensor, NH: int, segments: list[tuple[int, int]] | None) -> None:
        self.n = 0  # global index of the next chunk
        self.flat = segments is not None
        self.restart: dict[int, int] = {}  # chunk index -> sequence that starts there
        self.finish: dict[int, int] = {}  # chunk index -> sequence that ends there
        self.finals: list[Tensor] = []
        if segments is None:
            self.S = h0.reshape(NH, *h0.shape[2:])
        else:
            self.S = h0[0]
            self.restart = {first: i for i, (first, count) in enumerate(segments) if count}
            self.finish = {first + count - 1: i for i, (first, count) in enumerate(segments) if count}
            self.finals = list(h0.unbind(0))  # empty sequences keep their entry state

    def run(self, wv: Tensor, wk: Tensor, kc: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
        """Scan ``[G, NH, ...]`` chunks; returns the stacked chunk-entry states and corrected values ``U``.

        unbind rather than ``wv[n]``: autograd turns each indexing op into a zero-filled full-size gradient
        (O(G^2) work in backward, measured at half the backward time), while unbind's backward is one stack.
        """
        entry, news = [], []
        S = self.S
        for wv_n, wk_n, kc_n, last_n in zip(*(x.unbind(0) for x in (wv, wk, kc, last)), strict=True):
            if self.n in self.restart:
                S = self.finals[self.restart[self.n]]
            entry.append(S)
            u = torch.baddbmm(wv_n, wk_n, S, alpha=-1.0)  # corrected values U = Wv - Wk S
            news.append(u)
            S = torch.baddbmm(S * last_n, kc_n, u)
            if self.n in self.finish:
                self.finals[self.finish[self.n]] = S
            self.n += 1
        self.S = S
        return torch.stack(entry), torch.stack(news)

    def final(self, N: int, H: int) -> Tensor:
        if self.flat:
            return torch.stack(self.finals)
        return self.S.reshape(N, H, *self.S.shape[1:])


def _chunk_group(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scan: _Scan, scale: float, per_channel: bool
) -> Tensor:
    """Outputs ``[Xg, C, V]`` for a group of whole chunks (chunk-major rows), advancing ``scan``."""
    Xg, C, K = k.shape
    V = v.shape[-1]
    NH = scan.S.shape[0]
    G = Xg // NH
    q = q * scale
    gc = (g * _LOG2E).cumsum(dim=1)  # within-chunk cumulative log2-decay, <= 0 and non-increasing
    if per_channel:
        aqk, akk = _intra_kda(q, k, gc)
    else:
        aqk, akk = _intra_gdn(q, k, gc)
        gc = gc[..., None]  # [Xg, C, 1]: broadcasts over key channels from here on
    g_last = gc[:, -1:]  # [Xg, 1, K or 1]
    gamma = _decay(gc)  # decay from chunk start to t
    tail = _decay(g_last - gc)  # decay from t to chunk end

    # WY / UT transform: [Wv | Wk] = (I + diag(beta) Akk)^-1 diag(beta) [V | exp(G) K]. Only the strictly
    # lower triangle of Akk is read, so its diagonal and upper part need no masking.
    w = _unit_lower_solve(beta[:, :, None] * akk, beta[:, :, None] * torch.cat([v, k * gamma], dim=-1))
    wv, wk = w[:, :, :V].view(G, NH, C, V), w[:, :, V:].view(G, NH, C, K)
    kc = (k * tail).transpose(1, 2).view(G, NH, K, C)
    last = _decay(g_last).transpose(1, 2).reshape(G, NH, -1, 1)  # [G, NH, K or 1, 1]
    states, u = scan.run(wv, wk, kc, last)
    return torch.baddbmm(aqk @ u.view(Xg, C, V), q * gamma, states.view(Xg, K, V))


@fp32_scan
def chunk_delta_rule(x: DeltaRuleInputs, chunk_size: int = 64) -> DeltaRuleOutput:
    """Pure-PyTorch chunked delta rule: ``g`` ``[B, T, H]`` gives GDN, ``[B, T, H, K]`` gives KDA.

    Short inputs use a chunk no longer than needed (rounded up to 16), which changes nothing mathematically.
    """
    B, T, H, K = x.k.shape
    V = x.v.shape[-1]
    out_dtype = x.v.dtype
    q, k, v, g, beta = x.tensors
    layout = None
    if x.cu_seqlens is not None:
        lens = (x.cu_seqlens[1:] - x.cu_seqlens[:-1]).tolist()
        longest = max(lens, default=0)
        C = min(chunk_size, max(16, -(-longest // 16) * 16))
        # Batch the sequences (one row each, padded to the longest) unless that would more than double the
        # work; then lay them end to end and restart the scan at each one.
        batched = len(lens) * -(-longest // C) <= 2 * sum(-(-n // C) for n in lens)
        layout = VarlenLayout(x.cu_seqlens, T, k.device, multiple=C, flat=not batched)
        q, k, v, g, beta = (layout.pad(t) for t in x.tensors)
    else:
        C = min(chunk_size, max(16, -(-T // 16) * 16))
    N, L = k.shape[:2]
    n_seq = N if layout is None else layout.n
    if L == 0 or T == 0:  # nothing to scan: states pass through unchanged
        S = q.new_zeros(n_seq, H, K, V) if x.initial_state is None else x.initial_state
        final = S.to(torch.float32, copy=True) if x.output_final_state else None
        return v.new_zeros(B, T, H, V, dtype=out_dtype), final

    q, k, v, g, beta = (_to_chunks(t, C) for t in (q, k, v, g, beta))  # [X = NT * N * H, C, *]
    X, NH = q.shape[0], N * H
    NT = X // NH

    h0 = q.new_zeros(n_seq, H, K, V) if x.initial_state is None else x.initial_state.to(torch.float32)
    scan = _Scan(h0, NH, None if layout is None else layout.segments)

    # Chunks are processed in groups of about _GROUP_ROWS (chunk, head) rows, so every intermediate stays
    # around 1.5 MB (cache-resident; large fresh allocations also page-fault on every call). Measured on one
    # thread: 2.3x faster at 16k tokens and ~1.3x at 4k than one pass over all chunks.
    # (split, not slicing: a slice's backward is a zero-filled full-size gradient per group.)
    step = max(1, _GROUP_ROWS // NH) * NH
    groups = zip(q.split(step), k.split(step), v.split(step), g.split(step), beta.split(step), strict=True)
    outs = [_chunk_group(*qkvgb, scan, x.scale, x.per_channel) for qkvgb in groups]
    o = outs[0] if len(outs) == 1 else torch.cat(outs)
    o = o.view(NT, N, H, C, V).permute(1, 0, 3, 2, 4).reshape(N, NT * C, H, V)[:, :L]
    if layout is not None:
        o = layout.unpad(o)
    return o.to(out_dtype), (scan.final(N, H) if x.output_final_state else None)


chunk_gated_delta_rule = delta_rule_op(
    chunk_delta_rule,
    name="chunk_gated_delta_rule",
    per_channel=False,
    fla_op="chunk_gdn",
    doc="""Gated DeltaNet, chunked form (prefill / training). ``g``: per-head log-decay ``[B, T, H]`` (<= 0).

    Args:
        q, k: ``[B, T, H, K]``, already L2-normalised by the caller.
        v: ``[B, T, H, V]``.
        beta: ``[B, T, H]`` write strength in (0, 1).
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (any float dtype, used as fp32); zeros when omitted.
        output_final_state: return the state after the last token.
        cu_seqlens: ``[N + 1]`` cumulative lengths for sequences packed as ``B == 1``.
        chunk_size: tokens per chunk. Any value gives the same result; 64 is fla's. Larger chunks do more
            O(C^2) work inside chunks and fewer sequential scan steps; on one CPU thread 32 measured ~15%
            faster than 64 at K = V = 64.

    Returns:
        ``(o [B, T, H, V] in v.dtype, final_state [N, H, K, V] fp32 or None)``. On CUDA with ``fla``
        installed this routes to fla's ``chunk_gated_delta_rule`` (untested here; fla picks its own chunk
        size).
    """,
)

chunk_kda = delta_rule_op(
    chunk_delta_rule,
    name="chunk_kda",
    per_channel=True,
    fla_op="chunk_kda",
    doc="""Kimi Delta Attention, chunked form. ``g`` is the per-channel log-decay ``[B, T, H, K]`` (<= 0).

    Same contract as :func:`chunk_gated_delta_rule`; on CUDA with ``fla`` installed this routes to fla's
    ``chunk_kda`` (untested here).
    """,
)
