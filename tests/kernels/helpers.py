"""Random inputs for the delta-rule kernels, shaped and scaled like the mixers produce them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import l2_norm


def delta_inputs(
    rule: str,
    B: int = 2,
    T: int = 70,
    H: int = 2,
    K: int = 16,
    V: int = 12,
    *,
    seed: int = 0,
    initial_state: bool = False,
    n_states: int | None = None,
    min_log_decay: float = -5.0,
) -> dict[str, Tensor | None]:
    """q, k (L2-normalised), v, g (<= 0, ``[B,T,H]`` for gdn or ``[B,T,H,K]`` for kda), beta, initial_state.

    The KDA log-decay spans ``[min_log_decay, 0]`` per channel (some channels forget within a token, some
    barely decay), which is the regime where a careless chunked form overflows.
    """
    gen = torch.Generator().manual_seed(seed)
    q = l2_norm(torch.randn(B, T, H, K, generator=gen))
    k = l2_norm(torch.randn(B, T, H, K, generator=gen))
    v = torch.randn(B, T, H, V, generator=gen)
    beta = torch.rand(B, T, H, generator=gen) * 0.9 + 0.05
    if rule == "gdn":
        g = -F.softplus(torch.randn(B, T, H, generator=gen)) * 0.5
    elif rule == "kda":
        g = torch.rand(B, T, H, K, generator=gen) * min_log_decay
    else:
        raise ValueError(rule)
    h0 = torch.randn(n_states or B, H, K, V, generator=gen) if initial_state else None
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": h0}


def max_err(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


EPS32 = torch.finfo(torch.float32).eps


def fp32_tol(ref: Tensor, terms: int = 64) -> float:
    """Tolerance for two fp32 evaluations of the same math that add the same terms in a different order
    (chunked vs token-by-token, batched vs one at a time, another BLAS). Each compared value sums at most
    ``terms`` products (64 = one chunk, the longest run of terms added without an intermediate fp32 rounding
    of the state), so reassociation moves it by at most ~``terms * eps * magnitude`` (the recursive-summation
    bound); 4x that keeps the check off the edge on any machine, and a real mistake shows up as 1e-3 or more.
    A fixed 1e-5 was not that: chunked KDA sits at 5.4e-6 against the naive form here."""
    magnitude = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    return 4 * terms * EPS32 * magnitude
