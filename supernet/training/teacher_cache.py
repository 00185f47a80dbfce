"""The teacher's targets, computed once and streamed from disk - or computed in the loop, for comparison.

The teacher is the supernet's own all-FA placement: with the trunk and FA frozen it *is* the teacher (the core
guarantees all-FA reproduces the teacher's logits), and its ``mixer_io`` gives each layer's attention input
(the normed residual stream) and output without hooks into a transformers model.

On disk (one directory, all raw little-endian arrays opened with ``np.memmap``, so nothing is held in RAM and
a batch reads only its own rows):

    meta.json           shapes, k, temperature and a fingerprint of model + data; written last, so a cache
                        whose build was interrupted has no meta.json and is rebuilt rather than read
    topk_logp.f16       [N, T, k]  teacher log-probs (at the loss temperature) of its top-k tokens
    topk_idx.i32        [N, T, k]  their token ids
    rest.f32            [N, T]     log-mass of all other tokens
    out_{layer}.f16     [N, T, H]  attention output per layer (activation matching)

The warm start does not read this cache: it streams its own chunks (warmstart.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from supernet.model import SupernetForCausalLM
from supernet.training.losses import teacher_topk


@dataclass
class Targets:
    top: Tensor  # [B, T, k] fp16 log-probs
    idx: Tensor  # [B, T, k] int32
    rest: Tensor  # [B, T] fp32
    outs: list[Tensor]  # per layer [B, T, H]


@torch.no_grad()
def run_teacher(teacher: SupernetForCausalLM, ids: Tensor, k: int, temperature: float) -> Targets:
    out = teacher(ids, "all-fa", return_mixer_io=True)
    top, idx, rest = teacher_topk(out.logits, k, temperature)
    return Targets(top, idx, rest, [o.detach() for _, o in out.mixer_io])


class TeacherInLoop:
    """Targets computed by running the teacher on each batch (no disk, no up-front cost, a teacher pass per
    step)."""

    def __init__(self, teacher: SupernetForCausalLM, k: int, temperature: float) -> None:
        self.teacher, self.k, self.temperature = teacher, k, temperature

    def get(self, rows: np.ndarray, ids: Tensor) -> Targets:
        return run_teacher(self.teacher, ids, self.k, self.temperature)


class TeacherCache:
    """Targets streamed from a directory filled once by :meth:`build`."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        n, t, k, h = self.meta["n"], self.meta["seq_len"], self.meta["k"], self.meta["hidden"]
        mm = lambda name, dtype, shape: np.memmap(self.dir / name, dtype=dtype, mode="r", shape=shape)  # noqa: E731
        self.top = mm("topk_logp.f16", np.float16, (n, t, k))
        self.idx = mm("topk_idx.i32", np.int32, (n, t, k))
        self.rest = mm("rest.f32", np.float32, (n, t))
        layers = self.meta["layers"]
        self.outs = [mm(f"out_{i}.f16", np.float16, (n, t, h)) for i in range(layers)]

    @staticmethod
    def is_valid(directory: str | Path, fingerprint: str) -> bool:
        meta = Path(directory) / "meta.json"
        return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        directory: str | Path,
        teacher: SupernetForCausalLM,
        data: np.ndarray,
        *,
        k: int,
        temperature: float,
        batch_size: int,
        fingerprint: str,
        progress: bool = False,
    ) -> TeacherCache:
        from tqdm import tqdm

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "meta.json").unlink(missing_ok=True)
        n, t = data.shape
        cfg = teacher.config
        h, layers = cfg.hidden_size, cfg.num_hidden_layers
        mm = lambda name, dtype, shape: np.memmap(directory / name, dtype=dtype, mode="w+", shape=shape)  # noqa: E731
        top, idx, rest = (
            mm("topk_logp.f16", np.float16, (n, t, k)),
            mm("topk_idx.i32", np.int32, (n, t, k)),
            mm("rest.f32", np.float32, (n, t)),
        )
        outs = [mm(f"out_{i}.f16", np.float16, (n, t, h)) for i in range(layers)]
        device = teacher.embed_tokens.weight.device
        for start in tqdm(range(0, n, batch_size), desc="teacher cache", disable=not progress, unit="batch"):
            end = min(n, start + batch_size)
            tg = run_teacher(teacher, torch.from_numpy(data[start:end]).long().to(device), k, temperature)
            top[start:end], idx[start:end], rest[start:end] = (
                tg.top.cpu().numpy(),
                tg.idx.cpu().numpy(),
                tg.rest.cpu().numpy(),
            )
            for i in range(layers):
                outs[i][start:end] = tg.outs[i].cpu().half().numpy()
        for arr in (top, idx, rest, *outs):
            arr.flush()
        del top, idx, rest, outs
        meta = {
            "fingerprint": fingerprint,
            "n": n,
            "seq_len": t,
            "k": k,
            "hidden": h,
            "layers": layers,
            "temperature": temperature,
        }
        tmp = directory / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(directory / "meta.json")
        return cls(directory)

    def get(self, rows: np.ndarray, ids: Tensor | None = None) -> Targets:
        rows = np.asarray(rows)
        order = np.argsort(rows)  # memmap reads in file order, then put back in batch order
        inverse = np.argsort(order)
        sorted_rows = rows[order]
        take = lambda arr: torch.from_numpy(np.ascontiguousarray(arr[sorted_rows])[inverse])  # noqa: E731
        outs = [take(o).float() for o in self.outs]
        return Targets(take(self.top), take(self.idx), take(self.rest), outs)
