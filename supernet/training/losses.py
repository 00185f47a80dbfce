"""Distillation losses.

* Activation matching: a layer's student mixer output against the teacher's attention output at that layer,
  as a relative squared error ``||s - t||^2 / ||t||^2`` per sequence, so layers with large and small
  activations weigh the same and 1.0 means "no better than outputting zero".
* Logit distillation on the teacher's top-k tokens: the vocabulary is coarsened to k + 1 buckets (the
  teacher's top k tokens and one bucket for everything else), and forward/reverse KL are exact on those
  buckets. The teacher's rest-bucket mass is stored exactly at cache time; the student's comes from a
  logsumexp over its other logits. This is a lower bound of the full-vocabulary KL that is tight when the
  top-k holds most of the mass, and it lets the cache keep k values per token instead of the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def activation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Relative squared error per row: [B, T, H] x2 -> [B] (fp32)."""
    s, t = student.float(), teacher.float()
    return (s - t).square().sum((1, 2)) / t.square().sum((1, 2)).clamp_min(1e-12)


@torch.no_grad()
def teacher_topk(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """What the cache keeps per token: top-k log-probs at ``temperature`` (fp16), their ids (int32) and the
    log-mass of every other token (fp32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top, idx = logp.topk(k, dim=-1)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
    return top.half(), idx.int(), rest


def _student_buckets(logits: Tensor, idx: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Student log-probs of the teacher's top-k ids and of the rest bucket."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.gather(-1, idx.long()) - lse
    rest = torch.logsumexp(z.scatter(-1, idx.long(), float("-inf")), dim=-1) - lse.squeeze(-1)
    return top, rest.clamp_min(-50.0)  # an empty rest bucket (k = vocab) must not give 0 * inf


def topk_kl(
    student_logits: Tensor, t_top: Tensor, t_idx: Tensor, t_rest: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(forward KL(teacher||student), reverse KL(student||teacher)) per row [B], mean over tokens, times T^2.
    """
    s_top, s_rest = _student_buckets(student_logits, t_idx, temperature)
    t_top, t_rest = t_top.float(), t_rest.float()
    p_top, p_rest = t_top.exp(), t_rest.exp()
    q_top, q_rest = s_top.exp(), s_rest.exp()
    forward = (p_top * (t_top - s_top)).sum(-1) + p_rest * (t_rest - s_rest)
    reverse = (q_top * (s_top - t_top)).sum(-1) + q_rest * (s_rest - t_rest)
    scale = temperature**2
    return forward.mean(-1) * scale, reverse.mean(-1) * scale


def full_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Exact KL(teacher || student) per token over the whole vocabulary (evaluation)."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


def next_token_ce(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy per row [B]."""
    b, t, v = logits.shape
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1).long(), reduction="none"
    )
    return ce.view(b, t - 1).mean(-1)
