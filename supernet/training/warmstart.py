"""Stage 1, the warm start: every layer's non-FA mixers learn to reproduce the teacher's attention output from
the teacher's own layer input, each layer alone (no backprop through the model), until a held-out error stops
improving.

Why streamed chunks rather than a teacher cache on disk: a layer's inputs and outputs for every layer cost
~140 KB per token in fp32, so a cache cannot grow with the token budget. Instead the frozen teacher runs over
one chunk of training sequences at a time; the chunk's per-layer (input, output) pairs stay in memory while
every layer's mixers train on them, then the chunk is dropped and the next one is drawn. Memory is bounded by
the chunk size, disk by nothing, and the teacher runs once per token however many mixers learn from it.

Why early stopping: layers converge at very different rates (a late layer's GDN can reach a relative error of
0.05 while an early one plateaus at 0.3), so a fixed step count either wastes time or stops short. After each
chunk every (layer, mixer) is scored on fixed held-out sequences; one without a relative improvement of
``min_delta`` for ``patience`` chunks first has its learning rate cut (``lr_drops`` times), then stops, keeping
its best weights.

Determinism and resume: chunk c's rows come from per-epoch permutations seeded by the run seed (a function of
c only), and a (layer, mixer)'s batches from a generator seeded by (seed, c, layer, mixer). A checkpoint after
every chunk holds the weights, each (layer, mixer)'s best weights and AdamW state, and the progress table, so a
killed run resumes at the next chunk with exactly the state an uninterrupted run had.

Data parallel (torchrun): rank r owns the layers i with i % world == r, every rank runs the teacher over the
chunk, and after each chunk the ranks exchange their layers' tensors so every rank (and rank 0's checkpoint)
holds all of them. Results equal a single process's, which trains the same layers on the same batches."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from supernet.mixers import MixerContext
from supernet.model import SupernetForCausalLM
from supernet.training.data import batch_rows
from supernet.training.losses import activation_loss
from supernet.training.state import optimizer_from_tensors, optimizer_to_tensors

if TYPE_CHECKING:
    from supernet.training.trainer import Trainer

BEST = "best::"  # prefix of a (layer, mixer)'s best weights inside a warm-start checkpoint
OPTIM = "optim::"  # prefix of its AdamW state


@dataclass
class MixerProgress:
    """One (layer, mixer)'s warm-start record: the per-layer table of the run's metrics and docs."""

    layer: int
    mixer: str
    initial: float  # held-out relative error at transfer init (before the least-squares output scale)
    best: float  # best held-out error so far (its weights are kept)
    last: float  # held-out error after the latest chunk
    steps: int = 0
    tokens: int = 0
    stale: int = 0  # evaluations since the last improvement
    drops: int = 0  # learning-rate cuts so far
    lr: float = 0.0
    done: bool = False
    early: bool = False  # stopped on a held-out plateau (not by the step cap)

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.mixer}"


@dataclass
class LayerPairs:
    """The teacher's attention input and output of every layer on some sequences, held in memory."""

    ins: list[Tensor]  # per layer [N, T, H] fp32
    outs: list[Tensor]


@torch.no_grad()
def teacher_pairs(teacher: SupernetForCausalLM, ids: Tensor, batch_size: int) -> LayerPairs:
    layers = teacher.config.num_hidden_layers
    ins: list[list[Tensor]] = [[] for _ in range(layers)]
    outs: list[list[Tensor]] = [[] for _ in range(layers)]
    for start in range(0, len(ids), batch_size):
        out = teacher(ids[start : start + batch_size], "all-fa", return_mixer_io=True)
        for i, (h, o) in enumerate(out.mixer_io):
            ins[i].append(h.float())
            outs[i].append(o.float())
    return LayerPairs([torch.cat(x) for x in ins], [torch.cat(x) for x in outs])


class WarmStart:
    """The chunked, early-stopped warm start of one trainer's model (see the module docstring)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.cfg = trainer, trainer.cfg.blockwise
        self.model = trainer.model
        self.d = trainer.d
        self.seed = trainer.cfg.run.seed
        layers = self.model.config.num_hidden_layers
        self.units = [
            (i, name)
            for i in range(layers)
            for name in self.cfg.mixers
            if any(p.requires_grad for p in self.model.mixer(i, name).parameters())
        ]
        self.progress: dict[str, MixerProgress] = {}
        self.optimizers: dict[str, torch.optim.AdamW] = {}
        self.best: dict[str, dict[str, Tensor]] = {}
        # Other ranks' optimiser state (tensors, param groups), kept only so that rank 0 can checkpoint it.
        self.foreign: dict[str, Tensor] = {}
        self.foreign_groups: dict[str, Any] = {}
        self.chunk = 0
        t = trainer.data.train.shape[1]
        positions = torch.arange(t).expand(self.cfg.batch_size, t)
        cos, sin = self.model.rotary(positions)
        self.ctx = MixerContext(positions, cos, sin)
        val = trainer.data.val[: self.cfg.val_sequences]
        if len(val) == 0:
            raise ValueError("blockwise: no held-out sequences to stop on (data.val is empty)")
        self.val = teacher_pairs(trainer.teacher, torch.from_numpy(val).long(), trainer.cfg.teacher_cache.batch_size)
        vpos = torch.arange(t).expand(len(val), t)
        vcos, vsin = self.model.rotary(vpos)
        self.val_ctx = MixerContext(vpos, vcos, vsin)

    # ------------------------------------------------------------------ bookkeeping

    def owned(self, layer: int) -> bool:
        return layer % self.d.world == self.d.rank

    def params(self, layer: int, name: str) -> dict[str, Tensor]:
        return {n: p for n, p in self.model.mixer(layer, name).named_parameters() if p.requires_grad}

    def full_name(self, layer: int, name: str, param: str) -> str:
        return f"layers.{layer}.mixers.{name}.{param}"

    @property
    def finished(self) -> bool:
        return bool(self.progress) and all(p.done for p in self.progress.values())

    def state_tensors(self) -> dict[str, Tensor]:
        """Best weights and optimiser state of every (layer, mixer), under prefixed names (rank 0 after a
        gather holds all of them)."""
        tensors: dict[str, Tensor] = {}
        for key, best in self.best.items():
            tensors.update({f"{BEST}{key}::{n}": t for n, t in best.items()})
        for key, opt in self.optimizers.items():
            opt_tensors, _ = optimizer_to_tensors(opt)
            tensors.update({f"{OPTIM}{key}::{n}": t for n, t in opt_tensors.items()})
        return {**self.foreign, **tensors}

    def state_json(self) -> dict[str, Any]:
        groups = {key: optimizer_to_tensors(opt)[1] for key, opt in self.optimizers.items()}
        return {
            "warm_chunk": self.chunk,
            "warm_progress": [asdict(p) for p in self.progress.values()],
            "warm_groups": {**self.foreign_groups, **groups},
        }

    def restore(self, tensors: dict[str, Tensor], state: dict[str, Any], *, own_optimizers: bool = True) -> None:
        """Continue from a warm-start checkpoint written by :meth:`state_json`/:meth:`state_tensors`
        (``own_optimizers=False``: keep the live optimisers of this rank's layers, as after an exchange)."""
        self.chunk = int(state.get("warm_chunk", 0))
        self.progress = {}
        for record in state.get("warm_progress", []):
            p = MixerProgress(**record)
            self.progress[p.key] = p
        if own_optimizers:
            self.optimizers = {}
        self.foreign, self.foreign_groups = {}, {}
        for key, groups in state.get("warm_groups", {}).items():
            layer, name = key.split(".", 1)
            prefix = f"{OPTIM}{key}::"
            mine = {n: t for n, t in tensors.items() if n.startswith(prefix)}
            if not self.owned(int(layer)):
                self.foreign.update(mine)
                self.foreign_groups[key] = groups
                continue
            if not own_optimizers:
                continue
            opt = self.new_optimizer(int(layer), name, self.progress[key].lr)
            opt.load_state_dict(optimizer_from_tensors({n[len(prefix) :]: t for n, t in mine.items()}, groups))
            self.optimizers[key] = opt
        for key in self.progress:
            prefix = f"{BEST}{key}::"
            best = {n[len(prefix) :]: t.clone() for n, t in tensors.items() if n.startswith(prefix)}
            if best:
                self.best[key] = best

    def new_optimizer(self, layer: int, name: str, lr: float) -> torch.optim.AdamW:
        betas = self.trainer.cfg.optim.betas
        return torch.optim.AdamW(list(self.params(layer, name).values()), lr=lr, betas=betas, weight_decay=0.0)

    # ------------------------------------------------------------------ the loop

    @torch.no_grad()
    def held_out_error(self, layer: int, name: str) -> float:
        y = self.model.mixer(layer, name)(self.val.ins[layer], self.model.layer(layer).attn, self.val_ctx, None)
        return float(activation_loss(y, self.val.outs[layer]).mean())

    @torch.no_grad()
    def fit_output_scale(self, layer: int, name: str, pairs: LayerPairs) -> None:
        """GDN/KDA outputs come out of an RMSNorm at unit scale, orders of magnitude off the attention output:
        one least-squares scale <y, t> / <y, y> (the output is linear in the norm weight) removes most of the
        initial error before any gradient step."""
        mixer = self.model.mixer(layer, name)
        norm_weight = getattr(mixer, "norm_weight", None)
        if norm_weight is None:
            return
        rows = slice(0, self.cfg.batch_size)
        y = mixer(pairs.ins[layer][rows], self.model.layer(layer).attn, self.ctx, None)
        t = pairs.outs[layer][rows]
        scale = float((y * t).sum() / y.square().sum().clamp_min(1e-12))
        if scale > 0:
            norm_weight.mul_(scale)

    def start_unit(self, layer: int, name: str, pairs: LayerPairs) -> MixerProgress:
        initial = self.held_out_error(layer, name)
        self.fit_output_scale(layer, name, pairs)
        scaled = self.held_out_error(layer, name)
        p = MixerProgress(layer, name, initial=initial, best=scaled, last=scaled, lr=self.cfg.lr)
        self.best[p.key] = {n: t.detach().clone() for n, t in self.params(layer, name).items()}
        self.optimizers[p.key] = self.new_optimizer(layer, name, self.cfg.lr)
        return p

    def train_unit(self, p: MixerProgress, pairs: LayerPairs) -> None:
        cfg = self.cfg
        layer, name = p.layer, p.mixer
        mixer, attn = self.model.mixer(layer, name), self.model.layer(layer).attn
        params = list(self.params(layer, name).values())
        optimizer = self.optimizers[p.key]
        rng = np.random.default_rng([self.seed, 11, self.chunk, layer, MIXER_INDEX[name]])
        n = len(pairs.ins[layer])
        steps = min(cfg.steps_per_chunk, cfg.steps - p.steps)
        for _ in range(steps):
            rows = torch.from_numpy(rng.choice(n, size=cfg.batch_size, replace=n < cfg.batch_size))
            with self.trainer.autocast(pairs.ins[layer].device):
                y = mixer(pairs.ins[layer][rows], attn, self.ctx, None)
            loss = activation_loss(y, pairs.outs[layer][rows]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, self.trainer.cfg.optim.grad_clip or float("inf"))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no stale gradient may leak into the stochastic stage
        p.steps += steps
        p.tokens += steps * cfg.batch_size * pairs.ins[layer].shape[1]
        self.judge(p)

    def judge(self, p: MixerProgress) -> None:
        """Early stopping on the held-out error: keep the best weights; on a plateau cut the lr, then stop."""
        cfg = self.cfg
        p.last = self.held_out_error(p.layer, p.mixer)
        significant = p.last < p.best * (1 - cfg.min_delta)
        if p.last < p.best:
            p.best = p.last
            self.best[p.key] = {n: t.detach().clone() for n, t in self.params(p.layer, p.mixer).items()}
        p.stale = 0 if significant else p.stale + 1
        if p.stale >= cfg.patience:
            if p.drops < cfg.lr_drops:
                p.drops, p.stale = p.drops + 1, 0
                p.lr *= cfg.lr_drop_factor
                for group in self.optimizers[p.key].param_groups:
                    group["lr"] = p.lr
            else:
                p.done = p.early = True
        if p.steps >= cfg.steps:
            p.done = True
        if p.done:
            with torch.no_grad():
                for n, t in self.params(p.layer, p.mixer).items():
                    t.copy_(self.best[p.key][n])

    def run(self) -> list[MixerProgress]:
        """Chunks until every (layer, mixer) has stopped; a checkpoint after each one."""
        trainer, cfg = self.trainer, self.cfg
        data = trainer.data.train
        n = len(data)
        chunk_rows = min(cfg.chunk_sequences, n)
        max_chunks = math.ceil(cfg.steps / max(1, cfg.steps_per_chunk))
        while not self.finished and self.chunk < max_chunks:
            t0 = time.perf_counter()
            rows = batch_rows(n, self.seed, self.chunk, 0, chunk_rows, 1)
            ids = torch.from_numpy(data[np.sort(rows)]).long()
            with trainer.autocast(ids.device):
                pairs = teacher_pairs(trainer.teacher, ids, trainer.cfg.teacher_cache.batch_size)
            teacher_s = time.perf_counter() - t0
            for layer, name in self.units:
                key = f"{layer}.{name}"
                if not self.owned(layer):
                    continue
                if key not in self.progress:
                    self.progress[key] = self.start_unit(layer, name, pairs)
                p = self.progress[key]
                if not p.done:
                    self.train_unit(p, pairs)
            del pairs
            self.chunk += 1
            self.exchange()
            elapsed = time.perf_counter() - t0
            active = [p for p in self.progress.values() if p.steps > 0 and not p.done]
            trainer.log(
                {
                    "phase": "blockwise_chunk",
                    "chunk": self.chunk,
                    "tokens": int(ids.numel()),
                    "teacher_seconds": teacher_s,
                    "seconds": elapsed,
                    "active": len(active) + sum(1 for p in self.progress.values() if p.steps == 0),
                    **{f"err/{p.key}": p.last for p in self.progress.values()},
                }
            )
            if trainer.cfg.run.progress and self.d.main:
                early = sum(p.early for p in self.progress.values())
                done = sum(p.done for p in self.progress.values())
                mean = {m: np.mean([p.best for p in self.progress.values() if p.mixer == m]) for m in cfg.mixers}
                print(
                    f"warm start chunk {self.chunk}: {done}/{len(self.progress)} stopped ({early} on a plateau), "
                    "mean held-out error "
                    + " ".join(f"{m} {v:.4f}" for m, v in mean.items())
                    + f" ({elapsed:.0f} s, teacher {teacher_s:.0f} s)",
                    flush=True,
                )
            trainer.save(
                0, None, "blockwise", self.state_json(), self.state_tensors(), tag=f"warm-{self.chunk:05d}"
            )
        for p in self.progress.values():  # the per-layer table: initial error, final error, tokens used
            trainer.log({"phase": "blockwise", **asdict(p), "loss_before": p.initial, "loss_after": p.best})
        return list(self.progress.values())

    def exchange(self) -> None:
        """After a chunk, every rank receives the other ranks' layers: weights, best weights, optimiser
        state and progress (so rank 0 can checkpoint everything, and the stochastic stage starts identical)."""
        if self.d.world == 1:
            return
        mine = {
            "params": {
                self.full_name(layer, name, n): t.detach()
                for layer, name in self.units
                if self.owned(layer)
                for n, t in self.params(layer, name).items()
            },
            "tensors": {n: t for n, t in self.state_tensors().items() if n not in self.foreign},
            "json": self.state_json(),
        }
        gathered: list[Any] = [None] * self.d.world
        dist.all_gather_object(gathered, mine)
        named = dict(self.model.named_parameters())
        tensors: dict[str, Tensor] = {}
        progress: dict[str, dict[str, Any]] = {}
        groups: dict[str, Any] = {}
        for rank, part in enumerate(gathered):
            with torch.no_grad():
                for n, t in part["params"].items():
                    named[n].copy_(t)
            tensors.update(part["tensors"])
            for record in part["json"]["warm_progress"]:
                if int(record["layer"]) % self.d.world == rank:
                    progress[f"{record['layer']}.{record['mixer']}"] = record
            for key, value in part["json"]["warm_groups"].items():
                if int(key.split(".")[0]) % self.d.world == rank:
                    groups[key] = value
        merged = {"warm_chunk": self.chunk, "warm_progress": list(progress.values()), "warm_groups": groups}
        self.restore(tensors, merged, own_optimizers=False)


MIXER_INDEX = {"fa": 0, "swa": 1, "gdn": 2, "kda": 3}


def progress_table(progress: list[MixerProgress]) -> str:
    """The per-layer Markdown table of a warm start (docs and `supernet train`'s summary)."""
    lines = [
        "| layer | mixer | error at init | final error | steps | tokens | stopped early |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(progress, key=lambda p: (p.layer, p.mixer)):
        lines.append(
            f"| {p.layer} | {p.mixer} | {p.initial:.4f} | {p.best:.4f} | {p.steps} | {p.tokens} | "
            f"{'yes' if p.early else 'no'} |"
        )
    return "\n".join(lines)


__all__ = ["LayerPairs", "MixerProgress", "WarmStart", "progress_table", "teacher_pairs"]
