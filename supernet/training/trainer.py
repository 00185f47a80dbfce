"""``supernet train``: warm start, then stochastic distillation, on one process or under ``torchrun``.

Stage 1 (warm start, warmstart.py, optional): every layer's non-FA mixers learn to reproduce the teacher's
attention output from the teacher's own layer input, on chunks the teacher streams through memory, each
(layer, mixer) until its held-out error stops improving.

Stage 2 (stochastic): each step draws a placement per sequence (see sampling.py), runs the student on it, and
minimises a weighted sum of per-layer activation matching, top-k logit KL (forward/reverse) and next-token CE.
Data-parallel: ranks take equal slices of the global batch; DistributedDataParallel (or FSDP2's
reduce-scatter, ``run.parallel: fsdp2``, see distributed.Fsdp2) averages the gradients, which with equal-length
packed sequences equals one process's gradient on the whole global batch.

Determinism (what resume and the 1-vs-N-process equivalence rest on): batch rows of step s come from a
permutation seeded by (seed, epoch) and placements from a generator seeded by (seed, step) - both functions of
the step, not of any RNG consumed so far - and the schedule is a function of the step. A checkpoint therefore
only needs the weights, the optimiser state and the step (RNG state is saved too, for anything stochastic
added later)."""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from supernet.checkpoint import CheckpointError, load_supernet, save_supernet
from supernet.config import MIXER_NAMES
from supernet.model import SupernetForCausalLM
from supernet.training.config import TrainConfig, config_fingerprint
from supernet.training.data import PackedData, batch_rows, prepare_data
from supernet.training.distributed import Dist, Fsdp2, init_distributed
from supernet.training.sampling import PlacementSampler
from supernet.training.state import (
    complete_checkpoints,
    load_training_state,
    optimizer_from_tensors,
    save_training_state,
)
from supernet.training.step import DistillStep, lr_at
from supernet.training.teacher_cache import TeacherCache, TeacherInLoop

# ------------------------------------------------------------------------------------------ model set-up


def prepare_model(cfg: TrainConfig, d: Dist) -> SupernetForCausalLM:
    """Load the starting supernet, building it from the teacher first if the config asks for that."""
    path = Path(cfg.model.checkpoint)
    if not cfg.model.checkpoint:
        raise ValueError(
            "model.checkpoint: a supernet directory to start from (or to build into) is required"
        )
    if not (path / "config.json").is_file():
        if not cfg.model.teacher:
            raise FileNotFoundError(
                f"model.checkpoint {path} has no config.json and model.teacher is not set "
                "(run `supernet build --out DIR` first, or set model.teacher)"
            )
        if d.main:
            from supernet.convert import build_from_teacher
            from supernet.teacher import load_teacher

            teacher, tokenizer = load_teacher(cfg.model.teacher)
            model = build_from_teacher(teacher, base_model=cfg.model.teacher, **cfg.model.build)
            save_supernet(model, path)
            tokenizer.save_pretrained(path)
        d.barrier()
    return load_supernet(path)


def trainable_names(model: SupernetForCausalLM, mode: str) -> list[str]:
    names = []
    for name, _ in model.named_parameters():
        if mode == "all" or (".mixers." in name and (mode == "mixers+fa" or ".mixers.fa." not in name)):
            names.append(name)
    return names


def freeze_except(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    keep = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return {n: p for n, p in model.named_parameters() if n in keep}


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False) -> None:
        self.cfg, self.d = cfg, init_distributed()
        self.fsdp: Fsdp2 | None = None  # set when the stochastic stage shards the model
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.out = cfg.out
        if self.d.main:
            existing = complete_checkpoints(self.out)
            if existing and not resume:
                raise FileExistsError(
                    f"{self.out} already holds checkpoints ({existing[0].name}); pass --resume to "
                    "continue that run or choose another run.out"
                )
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.d.barrier()
        self.resume = resume
        self.model = prepare_model(cfg, self.d)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.checkpoint)
        data_dir = self.out / "data"
        if self.d.main:
            self.data = prepare_data(cfg.data, self.tokenizer, data_dir)
        self.d.barrier()
        if not self.d.main:
            self.data = prepare_data(cfg.data, self.tokenizer, data_dir)
        self.names = trainable_names(self.model, cfg.optim.trainable)
        if not self.names:
            raise ValueError(
                "nothing to train: the model has no parameters matching optim.trainable="
                f"{cfg.optim.trainable!r} (lora mode with lora_rank 0 and no delta mixers?)"
            )
        self.params = freeze_except(self.model, self.names)
        # The teacher: the model's own all-FA placement while FA and the trunk stay frozen, else a copy.
        if cfg.optim.trainable == "mixers":
            self.teacher = self.model
        else:
            self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.sampler = PlacementSampler(cfg.sampling, self.model.config.num_hidden_layers, cfg.run.seed)
        self.metrics_path = self.out / "metrics.jsonl"
        self.tb = None
        if cfg.run.tensorboard and self.d.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                print("run.tensorboard: the tensorboard package is not installed; writing metrics.jsonl only")

    # ------------------------------------------------------------------ bookkeeping

    def log(self, record: dict[str, Any]) -> None:
        if not self.d.main:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record.get('phase', 'train')}/{key}", value, record["step"])

    def fingerprint(self) -> str:
        return config_fingerprint(
            self.data.fingerprint,
            self.model.config.to_dict(),
            self.cfg.loss.topk,
            self.cfg.loss.temperature,
            self.cfg.model.checkpoint,
        )

    def autocast(self, device: torch.device) -> torch.autocast:
        """The forward passes' precision (``run.autocast``); backward follows what forward recorded."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.run.autocast == "bf16")

    def targets_source(self):
        tc = self.cfg.teacher_cache
        if not tc.enabled:
            return TeacherInLoop(self.teacher, self.cfg.loss.topk, self.cfg.loss.temperature)
        directory = Path(tc.dir) if tc.dir else self.out / "teacher_cache"
        fp = self.fingerprint()
        if self.d.main and not TeacherCache.is_valid(directory, fp):
            t0 = time.perf_counter()
            TeacherCache.build(
                directory,
                self.teacher,
                self.data.train,
                k=self.cfg.loss.topk,
                temperature=self.cfg.loss.temperature,
                batch_size=tc.batch_size,
                fingerprint=fp,
                progress=self.cfg.run.progress,
            )
            n_tok = int(self.data.train.size)
            elapsed = time.perf_counter() - t0
            self.log(
                {"phase": "teacher_cache", "tokens": n_tok, "seconds": elapsed, "tok_per_s": n_tok / elapsed}
            )
        self.d.barrier()
        return TeacherCache(directory)

    def save(
        self,
        step: int,
        optimizer,
        phase: str,
        extra: dict[str, Any] | None = None,
        extra_tensors: dict[str, Tensor] | None = None,
        tag: str = "",
    ) -> None:
        params, optim = dict[str, Tensor](self.params), optimizer
        if self.fsdp is not None:  # every rank takes part in the gather; rank 0 receives full tensors
            params, optim = self.fsdp.full_state(optimizer)
        if self.d.main:
            save_training_state(
                self.out,
                step,
                {**params, **(extra_tensors or {})},
                optim,
                {"phase": phase, "fingerprint": self.fingerprint(), **(extra or {})},
                keep_last=self.cfg.run.keep_last,
                tag=tag,
            )
        self.d.barrier()

    def restore(self) -> dict[str, Any] | None:
        """Load the newest complete, intact checkpoint of this run (a corrupt one is reported and skipped)."""
        for directory in complete_checkpoints(self.out):
            try:
                params, optim, state, rng = load_training_state(directory)
            except CheckpointError as err:
                if self.d.main:
                    print(f"skipping unreadable checkpoint: {err}")
                continue
            if state.get("fingerprint") != self.fingerprint():
                raise CheckpointError(
                    f"{directory}: written by a run with different data/model/loss settings; "
                    "resume with the same config or start a new run.out"
                )
            missing = set(self.params) - set(params)
            if missing:
                raise CheckpointError(f"{directory}: missing trainable tensor(s) {sorted(missing)[:5]}")
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(params[name])
            torch.set_rng_state(rng)
            state["optimizer_tensors"] = optim
            state["extra_tensors"] = {n: t for n, t in params.items() if n not in self.params}
            state["directory"] = str(directory)
            return state
        return None

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
        o = self.cfg.optim
        return torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)

    # ------------------------------------------------------------------ stage 1

    def warm_start(self, state: dict[str, Any] | None) -> None:
        """The chunked, early-stopped warm start (warmstart.py), resumed from ``state`` when it is one of its
        checkpoints."""
        from supernet.training.warmstart import WarmStart, progress_table

        warm = WarmStart(self)
        if state is not None:
            warm.restore(state["extra_tensors"], state)
        progress = warm.run()
        if self.cfg.run.progress and self.d.main:
            print(progress_table(progress), flush=True)

    # ------------------------------------------------------------------ stage 2

    def train(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.d
        state = self.restore() if self.resume else None
        start_step = 0
        if state is None or state["phase"] == "blockwise":
            if cfg.blockwise.steps > 0:
                self.warm_start(state)
            state = None
        else:
            start_step = int(state["step"])

        micro = cfg.optim.batch_size // d.world
        if micro * d.world != cfg.optim.batch_size:
            raise ValueError(
                f"optim.batch_size={cfg.optim.batch_size} must be divisible by the {d.world} ranks"
            )
        source = self.targets_source()
        if d.world > 1 and cfg.run.parallel == "fsdp2":
            self.fsdp = Fsdp2(self.model, self.names)
            self.params = self.fsdp.params()
        params = list(self.params.values())
        optimizer = self.make_optimizer(params, cfg.optim.lr)
        if state is not None and state.get("optimizer_tensors") is not None:
            saved = optimizer_from_tensors(state["optimizer_tensors"], state["optimizer_groups"])
            if self.fsdp is not None:
                self.fsdp.load_optimizer(optimizer, saved)
            else:
                optimizer.load_state_dict(saved)
        step_module: nn.Module = DistillStep(self.model, cfg)
        ddp = None
        if d.world > 1 and self.fsdp is None:
            from torch.nn.parallel import DistributedDataParallel

            step_module = ddp = DistributedDataParallel(step_module, find_unused_parameters=True)
        n = len(self.data.train)
        device = self.model.embed_tokens.weight.device
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.optim.steps,
            initial=start_step,
            disable=not (cfg.run.progress and d.main),
            unit="step",
            dynamic_ncols=True,
        )
        history: list[dict[str, Any]] = []
        self.model.train()
        for step in range(start_step, cfg.optim.steps):
            t0 = time.perf_counter()
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = torch.zeros(5)
            mixer_sum: dict[str, float] = defaultdict(float)
            mixer_cnt: dict[str, int] = defaultdict(int)
            for m in range(cfg.optim.grad_accum):
                rows = batch_rows(n, cfg.run.seed, step, m, cfg.optim.batch_size, cfg.optim.grad_accum)
                placements = self.sampler.for_step(step * cfg.optim.grad_accum + m, cfg.optim.batch_size)
                rows, placements = (
                    rows[d.rank * micro : (d.rank + 1) * micro],
                    placements[d.rank * micro : (d.rank + 1) * micro],
                )
                ids = torch.from_numpy(self.data.train[rows]).long().to(device)
                sync = m == cfg.optim.grad_accum - 1 or d.world == 1
                if self.fsdp is not None:
                    self.fsdp.sharded.set_requires_gradient_sync(sync)
                ctx = nullcontext() if sync or ddp is None else ddp.no_sync()
                with ctx:
                    with self.autocast(device):  # forward only: backward replays the recorded precisions
                        targets = source.get(rows, ids)
                        loss, s, act = step_module(ids, placements, targets)
                    (loss / cfg.optim.grad_accum).backward()
                stats += s.cpu() / cfg.optim.grad_accum
                for li, row_losses in enumerate(act.cpu().tolist()):
                    for r, value in enumerate(row_losses):
                        mixer_sum[placements[r][li]] += value
                        mixer_cnt[placements[r][li]] += 1
            for p in params:
                # A mixer no row used this step gets a zero gradient rather than none, as DDP gives it on
                # every rank: Adam's step count (and momentum) then advance the same on 1 and N processes.
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats = d.mean(stats)
            per_mixer = self._mixer_means(mixer_sum, mixer_cnt)
            elapsed = time.perf_counter() - t0
            tokens = cfg.optim.batch_size * cfg.optim.grad_accum * self.data.train.shape[1]
            record = {
                "phase": "train",
                "step": step + 1,
                "lr": lr,
                "loss": float(stats[0]),
                "activation": float(stats[1]),
                "forward_kl": float(stats[2]),
                "reverse_kl": float(stats[3]),
                "ce": float(stats[4]),
                "grad_norm": float(grad_norm),
                "tok_per_s": tokens / elapsed,
                **{f"act_{k}": v for k, v in per_mixer.items()},
            }
            history.append(record)
            if (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.optim.steps:
                self.log(record)
            bar.set_postfix_str(
                f"loss {record['loss']:.4f} {record['tok_per_s']:.0f} tok/s "
                + " ".join(f"{k} {v:.3f}" for k, v in per_mixer.items())
            )
            bar.update(1)
            if (step + 1) % cfg.run.save_every == 0 and step + 1 < cfg.optim.steps:
                self.save(step + 1, optimizer, "train")
            if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and step + 1 < cfg.optim.steps:
                self.evaluate(step + 1)
        bar.close()
        self.model.eval()
        self.save(cfg.optim.steps, optimizer, "train")
        if self.fsdp is not None:  # from here on (final weights, evaluation) rank 0 works on a full copy
            model, teacher = self.unsharded()
            if d.main:
                self.model, self.teacher = model, teacher
            self.fsdp = None
        final = self.out / "final"
        if d.main:
            tmp = self.out / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_supernet(self.model, tmp)
            self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        d.barrier()
        results = self.evaluate(cfg.optim.steps) if cfg.run.eval_placements else {}
        return {"history": history, "eval": results, "final": str(final)}

    def _mixer_means(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        names = list(MIXER_NAMES)  # the same list on every rank, whatever each rank's rows used
        values = torch.tensor(
            [[sums.get(k, 0.0), float(counts.get(k, 0))] for k in names], dtype=torch.float64
        )
        if self.d.world > 1:
            dist.all_reduce(values)
        return {k: float(v[0] / v[1]) for k, v in zip(names, values, strict=True) if v[1] > 0}

    def unsharded(self) -> tuple[Any, Any]:
        """(model, teacher) holding plain tensors: themselves, or under FSDP2 a full copy gathered onto rank 0
        (None on the other ranks). Every rank must call it."""
        if self.fsdp is None:
            return self.model, self.teacher
        model = self.fsdp.gather(lambda: SupernetForCausalLM(self.model.config))
        return model, model if self.teacher is self.model else self.teacher

    def evaluate(self, step: int) -> dict[str, dict[str, float]]:
        from supernet.training.evaluate import evaluate_placements

        model, teacher = self.unsharded()
        if not self.d.main:
            return {}
        was_training = model.training
        model.eval()
        val = torch.from_numpy(self.data.val).long()
        results = evaluate_placements(model, val, self.cfg.run.eval_placements, teacher=teacher)
        model.train(was_training)
        self.log(
            {
                "phase": "eval",
                "step": step,
                **{f"{p}/{k}": v for p, r in results.items() for k, v in r.items()},
            }
        )
        return results


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.train()
    finally:
        if trainer.tb is not None:
            trainer.tb.close()


__all__ = ["PackedData", "Trainer", "lr_at", "train"]
