"""Held-out perplexity and KL to the teacher for one or more placements (``supernet eval``).

Each batch runs the teacher once, then every placement on the same tokens; KL(teacher || placement) is exact
over the whole vocabulary, averaged over tokens; perplexity is exp of the mean next-token cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from supernet.model import SupernetForCausalLM
from supernet.placement import format_placement
from supernet.training.losses import full_kl

TEACHER = "teacher"


def _ce_sum(logits: Tensor, ids: Tensor) -> float:
    v = logits.shape[-1]
    return float(
        F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="sum")
    )


@torch.inference_mode()
def evaluate_placements(
    model: SupernetForCausalLM,
    data: Tensor,
    placements: Sequence[str],
    teacher: SupernetForCausalLM | Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 4,
    include_teacher: bool = False,
) -> dict[str, dict[str, float]]:
    """``{placement: {"ppl", "kl", "ce"}}`` over ``data [N, T]``.

    ``teacher`` is a callable ids -> logits (e.g. a transformers model), a supernet (its all-FA placement is
    used) or None (the model's own all-FA placement). With ``include_teacher`` the teacher's own perplexity is
    reported as the row ``"teacher"``."""
    if teacher is None:
        teacher = model
    if isinstance(teacher, SupernetForCausalLM):
        sup = teacher
        teacher_fn = lambda ids: sup(ids, "all-fa").logits  # noqa: E731
    else:
        teacher_fn = teacher
    specs = {p: model.placement(p) for p in placements}
    sums = {p: [0.0, 0.0] for p in placements}  # ce sum, kl sum
    teacher_ce = 0.0
    n_pred = n_tok = 0
    device = model.embed_tokens.weight.device
    for start in range(0, len(data), batch_size):
        ids = data[start : start + batch_size].to(device)
        t_logits = teacher_fn(ids).float()
        teacher_ce += _ce_sum(t_logits, ids)
        for p, spec in specs.items():
            logits = model(ids, spec).logits.float()
            sums[p][0] += _ce_sum(logits, ids)
            sums[p][1] += float(full_kl(logits, t_logits).sum())
        n_pred += ids.shape[0] * (ids.shape[1] - 1)
        n_tok += ids.numel()
    results = {}
    if include_teacher:
        results[TEACHER] = {"ppl": math.exp(teacher_ce / n_pred), "kl": 0.0, "ce": teacher_ce / n_pred}
    for p in placements:
        ce, kl = sums[p]
        results[p] = {"ppl": math.exp(ce / n_pred), "kl": kl / n_tok, "ce": ce / n_pred}
    return results


def hf_teacher_fn(hf_model) -> Callable[[Tensor], Tensor]:
    return lambda ids: hf_model(input_ids=ids).logits


def format_table(
    results: dict[str, dict[str, float]],
    model: SupernetForCausalLM | None = None,
    specs: dict[str, str] | None = None,
) -> str:
    """A Markdown table: placement (or preset name, with ``specs`` mapping names to placements), mixer counts,
    perplexity, KL to the teacher."""
    lines = ["| placement | FA/SWA/GDN/KDA | ppl | KL to teacher |", "|---|---|---|---|"]
    for p, r in results.items():
        counts = "-"
        if model is not None and p != TEACHER:
            spec = model.placement((specs or {}).get(p, p))
            counts = "/".join(str(spec.count(m)) for m in ("fa", "swa", "gdn", "kda"))
            if len(p) > 40:
                p = format_placement(spec)
        lines.append(f"| {p} | {counts} | {r['ppl']:.2f} | {max(r['kl'], 0.0):.4f} |")  # no -0.0000 from rounding
    return "\n".join(lines)
