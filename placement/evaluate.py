"""Measured quality of one placement: trace log-likelihood, KL to the teacher, needles, multiple choice.

Metrics (each stored separately in the results database, see store.py):

* ``trace_loglik``  mean log-probability (nats/token) of the teacher's sampled traces, continuation tokens
  only.
                    Higher is better; the reference placement scores the teacher's own cross-entropy.
* ``kl``            mean KL(teacher || placement) per token on held-out text (nats; 0 for the teacher).
* ``needle_acc``    share of passkey code digits that are the placement's argmax under teacher forcing (digit
                    accuracy: SmolLM2-135M often misses a code's first digit even with full attention, so
                    whole-code exact match, kept in the detail, is too coarse to rank placements);
  ``needle_loglik`` mean log-probability of the code digits. Both come from one pass and are stored together.
* ``mc:<name>``     accuracy on a multiple-choice JSONL file (choice with the highest summed log-probability).

The teacher is the reference placement (default all-FA) of the same supernet: in ``lora`` mode FA *is* the
teacher's attention over the shared trunk, so no second model is loaded. Its log-probabilities on the KL text
are computed once per process and reused for every placement.

``quality`` combines metrics linearly with configurable weights (default ``trace_loglik + needle_acc``: losing
every needle costs as much as one nat per trace token). The optimiser only sees that number; reports show
each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from placement.data import ChoiceSet, NeedleSet, TextSet
from placement.store import Key, ResultStore
from supernet.placement import format_placement

DEFAULT_QUALITY = {"trace_loglik": 1.0, "needle_acc": 1.0}
CORE_METRICS = ("trace_loglik", "kl", "needle_acc", "needle_loglik")


def parse_quality(spec: str | dict[str, float] | None) -> dict[str, float]:
    """``"trace_loglik=1,needle_acc=0.5"`` -> weights; names must be known metrics (or ``mc:<name>``)."""
    if spec is None or spec == "":
        return dict(DEFAULT_QUALITY)
    if isinstance(spec, dict):
        weights = dict(spec)
    else:
        weights = {}
        for item in spec.split(","):
            name, sep, value = item.strip().partition("=")
            try:
                weights[name.strip()] = float(value) if sep else 1.0
            except ValueError as err:
                raise ValueError(f"quality weight {item.strip()!r}: expected NAME=NUMBER") from err
    for name in weights:
        if name not in CORE_METRICS and not name.startswith("mc:"):
            raise ValueError(f"unknown metric {name!r} in quality; valid: {', '.join(CORE_METRICS)}, mc:<file stem>")
    return weights


def combine(metrics: dict[str, float], weights: dict[str, float]) -> float:
    return float(sum(w * metrics[name] for name, w in weights.items()))


# ----------------------------------------------------------------------------------------------- metric math


def _on(model, ids: torch.Tensor) -> torch.Tensor:
    """Token ids on the model's device (the data sets are built on CPU)."""
    return ids.to(model.embed_tokens.weight.device)


@torch.inference_mode()
def token_logprobs(model, ids: torch.Tensor, placement, batch_size: int = 4) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) for t >= 1: [N, T-1] fp32."""
    out = []
    for i in range(0, ids.shape[0], batch_size):
        chunk = _on(model, ids[i : i + batch_size])
        logp = torch.log_softmax(model(chunk, placement).logits.float(), dim=-1)
        out.append(logp[:, :-1].gather(-1, chunk[:, 1:, None]).squeeze(-1))
    return torch.cat(out)


def trace_loglik(model, traces: TextSet, placement) -> tuple[float, dict]:
    lp = token_logprobs(model, traces.ids, placement)[:, traces.score_from - 1 :]
    per_row = lp.mean(dim=1)
    return float(lp.mean()), {"per_sequence": [round(float(x), 5) for x in per_row], "tokens": lp.numel()}


@torch.inference_mode()
def full_logprobs(model, ids: torch.Tensor, placement) -> list[torch.Tensor]:
    """Per row [T, V] fp32 log-probabilities (one row at a time bounds memory to one row's logits)."""
    ids = _on(model, ids)
    return [torch.log_softmax(model(ids[i : i + 1], placement).logits[0].float(), dim=-1) for i in range(ids.shape[0])]


@torch.inference_mode()
def kl_to_reference(model, text: TextSet, placement, reference: list[torch.Tensor]) -> tuple[float, dict]:
    """Mean over tokens of KL(reference || placement), scored from ``text.score_from`` on."""
    kls = []
    for i, ref in enumerate(reference):
        logq = torch.log_softmax(model(_on(model, text.ids[i : i + 1]), placement).logits[0].float(), dim=-1)
        kl = (ref.exp() * (ref - logq)).sum(-1)[text.score_from - 1 :]
        kls.append(kl)
    per_row = [float(k.mean()) for k in kls]
    return float(torch.cat(kls).mean()), {"per_sequence": [round(x, 5) for x in per_row]}


@torch.inference_mode()
def needle_scores(model, needles: NeedleSet, placement) -> tuple[float, float, dict]:
    """(digit accuracy, mean digit log-prob, per-length/depth detail); needles weigh equally."""
    hits, lps, detail = [], [], []
    for seq, spans, depths in zip(needles.sequences, needles.answers, needles.depths, strict=True):
        # The queries sit at the end: only those positions need the LM head (a 49k-word head over a whole
        # haystack would cost about a quarter of the forward pass).
        start = min(first for first, _ in spans) - 1
        seq = _on(model, seq)
        logits = model(seq[None], placement, num_logits_to_keep=len(seq) - start).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        for (first, end), depth in zip(spans, depths, strict=True):
            pred = logp[first - 1 - start : end - 1 - start]
            target = seq[first:end]
            right = (pred.argmax(-1) == target).float()
            lp = float(pred.gather(-1, target[:, None]).mean())
            hits.append(float(right.mean()))
            lps.append(lp)
            detail.append(
                {
                    "length": len(seq),
                    "depth": depth,
                    "digit_acc": round(float(right.mean()), 4),
                    "exact": bool(right.all()),
                    "loglik": round(lp, 4),
                }
            )
    return sum(hits) / len(hits), sum(lps) / len(lps), {"needles": detail}


@torch.inference_mode()
def choice_accuracy(model, choices: ChoiceSet, placement) -> tuple[float, dict]:
    correct = 0
    for context, options, answer in choices.items:
        scores = []
        for option in options:
            ids = _on(model, torch.tensor([context + option]))
            logp = torch.log_softmax(model(ids, placement).logits[0].float(), dim=-1)
            n = len(context)
            target = ids[0, n:]
            scores.append(float(logp[n - 1 : -1].gather(-1, target[:, None]).sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == answer)
    return correct / len(choices.items), {"items": len(choices.items)}


# ----------------------------------------------------------------------------------------------- evaluator


@dataclass
class EvalSettings:
    """How much data each metric uses. Defaults fit a 2-core CPU with a training job beside it."""

    trace_sequences: int = 4
    trace_length: int = 128  # tokens per trace, prompt included
    trace_prompt: int = 32
    temperature: float = 1.0
    kl_sequences: int = 4
    kl_length: int = 128
    # Beyond the demo's SWA window (256) already; longer haystacks (up to the teacher's 8192) via
    # --needle-lengths cost quadratic FA time on a CPU.
    needle_lengths: tuple[int, ...] = (512, 1024)
    needles_per_sequence: int = 3
    seed: int = 0
    reference: str = "all-fa"
    mc_files: tuple[str, ...] = ()

    def describe(self) -> str:
        return (
            f"traces {self.trace_sequences} x {self.trace_length} tokens ({self.trace_prompt}-token prompts, "
            f"T={self.temperature}); KL {self.kl_sequences} x {self.kl_length}; needles "
            f"{self.needles_per_sequence} per sequence at lengths {list(self.needle_lengths)}"
        )


@dataclass
class EvalData:
    traces: TextSet | None = None
    kl_text: TextSet | None = None
    needles: NeedleSet | None = None
    choices: dict[str, ChoiceSet] = field(default_factory=dict)


class Evaluator:
    """Scores placements of one checkpoint, reading and writing the results database.

    Data sets are built lazily (``data_factory`` returns the ones not given), so a run that only needs cached
    results never generates traces or loads the corpus."""

    def __init__(
        self,
        model,
        checkpoint: str,
        store: ResultStore,
        settings: EvalSettings | None = None,
        data: EvalData | None = None,
        data_factory: Callable[[str], object] | None = None,
    ) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.store = store
        self.settings = settings or EvalSettings()
        self.data = data or EvalData()
        self.data_factory = data_factory
        self._reference: list[torch.Tensor] | None = None
        self.computed = 0  # metrics computed (not read from the database) by this evaluator
        self.seconds = 0.0

    def _get(self, kind: str):
        value: Any = getattr(self.data, kind) if kind != "choices" else self.data.choices
        if value is None or (kind == "choices" and not value):
            if self.data_factory is None:
                raise ValueError(f"no {kind} data set and no way to build one")
            value = self.data_factory(kind)
            if kind == "choices":
                self.data.choices = value
            else:
                setattr(self.data, kind, value)
        return value

    def key(self, placement: str, metric: str, data_hash: str) -> Key:
        return Key(self.checkpoint, placement, metric, data_hash)

    def detail(self, placement: Sequence[str] | str, metric: str) -> dict:
        """The stored detail of an evaluated metric (per sequence / per needle), {} if not evaluated."""
        name = format_placement(self.model.placement(placement))
        found = self.store.get(self.key(name, metric, self._data_hash(metric)))
        return found[1] if found else {}

    def needle_by_length(self, placement: Sequence[str] | str) -> dict[int, float]:
        """Digit accuracy of the needles per haystack length: where a window or a decay stops seeing."""
        by: dict[int, list[float]] = {}
        for n in self.detail(placement, "needle_acc").get("needles", []):
            by.setdefault(int(n["length"]), []).append(float(n["digit_acc"]))
        return {k: round(sum(v) / len(v), 4) for k, v in sorted(by.items())}

    def available_metrics(self) -> list[str]:
        return list(CORE_METRICS) + [f"mc:{Path(f).stem}" for f in self.settings.mc_files]

    def evaluate(self, placement: Sequence[str] | str, metrics: Sequence[str]) -> dict[str, float]:
        """Metric values for one placement, computing (and storing) only those not in the database."""
        spec = self.model.placement(placement)
        name = format_placement(spec)
        out: dict[str, float] = {}
        for metric in metrics:
            if metric in out:
                continue
            data_hash = self._data_hash(metric)
            cached = self.store.get(self.key(name, metric, data_hash))
            if cached is not None:
                out[metric] = cached[0]
                continue
            t0 = time.perf_counter()
            results = self._compute(spec, metric)
            seconds = time.perf_counter() - t0
            self.seconds += seconds
            for m, (value, detail) in results.items():
                self.store.put(self.key(name, m, self._data_hash(m)), value, detail, seconds / len(results))
                self.computed += 1
                out.setdefault(m, value)
        return {m: out[m] for m in metrics}

    def _data_hash(self, metric: str) -> str:
        if metric == "trace_loglik":
            return self._get("traces").data_hash
        if metric == "kl":
            return self._get("kl_text").data_hash
        if metric in ("needle_acc", "needle_loglik"):
            return self._get("needles").data_hash
        if metric.startswith("mc:"):
            choices = self._get("choices")
            if metric[3:] not in choices:
                raise ValueError(
                    f"metric {metric!r}: no multiple-choice file with stem {metric[3:]!r} (have {sorted(choices)})"
                )
            return choices[metric[3:]].data_hash
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(self.available_metrics())}")

    def _compute(self, spec: tuple[str, ...], metric: str) -> dict[str, tuple[float, dict]]:
        if metric == "trace_loglik":
            return {metric: trace_loglik(self.model, self._get("traces"), spec)}
        if metric == "kl":
            text = self._get("kl_text")
            if self._reference is None:
                self._reference = full_logprobs(self.model, text.ids, self.settings.reference)
            return {metric: kl_to_reference(self.model, text, spec, self._reference)}
        if metric in ("needle_acc", "needle_loglik"):
            acc, lp, detail = needle_scores(self.model, self._get("needles"), spec)
            return {"needle_acc": (acc, detail), "needle_loglik": (lp, {})}
        choices = self._get("choices")[metric[3:]]
        return {metric: choice_accuracy(self.model, choices, spec)}


def corpus_data_factory(
    model,
    tokenizer,
    settings: EvalSettings,
    sources: Sequence[str] = ("demo",),
    trace_dir: Path | None = None,
) -> Callable[[str], object]:
    """Builds the standard data sets from the held-out demo corpus on first use."""
    from placement import data as D

    texts: list[str] = []

    def heldout() -> list[str]:
        if not texts:
            texts.extend(D.heldout_texts(sources))
        return texts

    def make(kind: str):
        s = settings
        if kind == "traces":
            return D.load_or_make_traces(
                model,
                tokenizer,
                heldout(),
                n=s.trace_sequences,
                length=s.trace_length,
                prompt_tokens=s.trace_prompt,
                temperature=s.temperature,
                seed=s.seed,
                directory=trace_dir,
                placement=s.reference,
            )
        if kind == "kl_text":
            # offset: documents after the ones trace prompts came from
            ids = D.token_rows(heldout(), tokenizer, s.kl_sequences, s.kl_length, s.seed, offset=s.trace_sequences * 2)
            return TextSet("heldout", ids, score_from=1)
        if kind == "needles":
            return D.make_needles(heldout(), tokenizer, s.needle_lengths, s.needles_per_sequence, s.seed)
        if kind == "choices":
            return {Path(f).stem: D.load_choices(f, tokenizer) for f in s.mc_files}
        raise ValueError(kind)

    return make
