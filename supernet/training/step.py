"""One stochastic-distillation micro-batch as a module, and the learning-rate schedule of that stage."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from supernet.model import SupernetForCausalLM
from supernet.training.config import TrainConfig
from supernet.training.losses import activation_loss, next_token_ce, topk_kl


def lr_at(cfg: TrainConfig, step: int) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant" or o.steps <= o.warmup_steps:
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class DistillStep(nn.Module):
    """One micro-batch's loss as a module, so DistributedDataParallel can wrap it (it sees tensors in, a loss
    out)."""

    def __init__(self, model: SupernetForCausalLM, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.loss_cfg = model, cfg.loss

    def forward(
        self, ids: Tensor, placements: list[tuple[str, ...]], targets
    ) -> tuple[Tensor, Tensor, Tensor]:
        lc = self.loss_cfg
        need_io = lc.activation > 0
        out = self.model(ids, placements, return_mixer_io=need_io)
        b = ids.shape[0]
        act = torch.zeros(len(self.model.layers), b, device=ids.device)
        if need_io:
            act = torch.stack(
                [
                    activation_loss(mixed, t.to(mixed.device))
                    for (_, mixed), t in zip(out.mixer_io, targets.outs, strict=True)
                ]
            )  # [L, B]
        zero = torch.zeros(b, device=ids.device)
        fkl, rkl = zero, zero
        if lc.forward_kl > 0 or lc.reverse_kl > 0:
            dev = out.logits.device
            fkl, rkl = topk_kl(
                out.logits, targets.top.to(dev), targets.idx.to(dev), targets.rest.to(dev), lc.temperature
            )
        ce = next_token_ce(out.logits, ids) if lc.ce > 0 else zero
        per_row = lc.activation * act.mean(0) + lc.forward_kl * fkl + lc.reverse_kl * rkl + lc.ce * ce
        # stats: total, act, fkl, rkl, ce (row means); per-layer-per-row activation losses feed per-mixer logs
        stats = torch.stack([per_row.mean(), act.mean(), fkl.mean(), rkl.mean(), ce.mean()]).detach()
        return per_row.mean(), stats, act.detach()
