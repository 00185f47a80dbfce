"""Evaluation data: held-out text, teacher traces, passkey needles and multiple-choice files.

Every set is a small bundle of token ids with a content hash (``data_hash``) that keys results in the
database, so a result is reused exactly when the tokens it was computed on are the same.

* Held-out text comes from the documents that training holds out (``supernet.training.data``: the demo corpus
  split with ``val_fraction=0.05, seed=0``, the training defaults), so KL and traces never score text the
  mixers trained on.
* Teacher traces are *sampled* continuations (temperature 1) of held-out prompts by the reference placement
  (all-FA, which in ``lora`` mode is the teacher exactly). Sampling at temperature 1 makes the mean trace
  log-likelihood an estimate of ``-H(teacher) - KL(teacher || student)``, i.e. forward KL up to a constant;
  greedy traces of a 135M model loop and reward copying instead. They are generated once and stored as
  safetensors in the cache directory (``$SUPERNET_CACHE/placement``), keyed by a fingerprint of the weights
  the reference uses.
* Needles: passkey sentences ("The secret code of the red door is 48213.") inserted at several depths into
  held-out prose; at the end every needle's prefix is repeated and the model must continue with its code.
  Several needles and queries share one sequence, so one forward pass scores every depth of one length.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from supernet.teacher import cache_dir

COLORS = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange", "silver", "golden")


def _hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.hexdigest()[:16]


def tensor_hash(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


@dataclass
class TextSet:
    """Token rows scored from ``score_from`` on (earlier tokens are context only)."""

    kind: str
    ids: torch.Tensor  # [N, T] long
    score_from: int = 1

    @property
    def data_hash(self) -> str:
        return _hash(self.kind, str(self.score_from), str(tuple(self.ids.shape)), tensor_hash(self.ids.long()))


@dataclass
class NeedleSet:
    """One sequence per length; ``answers[i]`` = (first, end) token spans of each needle's code in sequence
    i."""

    sequences: list[torch.Tensor]  # [T_i] long
    answers: list[list[tuple[int, int]]]
    depths: list[list[float]]

    @property
    def data_hash(self) -> str:
        parts = [tensor_hash(s.long()) for s in self.sequences]
        return _hash("needle", json.dumps(self.answers), *parts)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]


@dataclass
class ChoiceSet:
    """Multiple-choice items: score each choice's log-likelihood after the context, pick the best."""

    name: str
    items: list[tuple[list[int], list[list[int]], int]] = field(default_factory=list)  # (context, choices, answer)

    @property
    def data_hash(self) -> str:
        return _hash("mc", json.dumps(self.items))


# ----------------------------------------------------------------------------------------------- text


def heldout_texts(sources: Sequence[str] = ("demo",), val_fraction: float = 0.05, seed: int = 0) -> list[str]:
    """Texts of the documents the training data split holds out (same split function, same defaults)."""
    from supernet.training.data import read_documents, split_documents

    docs = read_documents(list(sources))
    _, val = split_documents(docs, val_fraction, seed)
    return [d.text for d in val]


def token_rows(texts: Sequence[str], tokenizer, n: int, length: int, seed: int, offset: int = 0) -> torch.Tensor:
    """``n`` rows of ``length`` tokens, each a window of a different document (documents drawn with ``seed``).

    ``offset`` skips that many documents of the shuffled order, so two sets (traces, KL) never share a
    document."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    for i in order[offset:]:
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            start = random.Random(seed * 1000 + i).randrange(0, len(ids) - length + 1)
            rows.append(ids[start : start + length])
        if len(rows) == n:
            return torch.tensor(rows, dtype=torch.long)
    raise ValueError(f"only {len(rows)} held-out documents have >= {length} tokens; need {n}")


# ----------------------------------------------------------------------------------------------- traces


@torch.inference_mode()
def sample_traces(
    model,
    prompts: torch.Tensor,
    new_tokens: int,
    placement: str = "all-fa",
    temperature: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Continue every prompt row by ``new_tokens`` sampled tokens (batched decode on per-sequence caches)."""
    gen = torch.Generator().manual_seed(seed)
    states = [model.new_state(placement) for _ in range(prompts.shape[0])]
    logits = model(prompts, states=states, num_logits_to_keep=1).logits[:, -1]
    out = []
    for _ in range(new_tokens):
        probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)
        token = torch.multinomial(probs, 1, generator=gen)
        out.append(token)
        logits = model(token, states=states).logits[:, -1]
    return torch.cat([prompts, torch.cat(out, dim=1)], dim=1)


def reference_fingerprint(model, placement: str = "all-fa") -> str:
    """Hash of every weight the reference placement reads (trunk + its mixers), so traces are regenerated
    exactly when the reference changes, and shared by checkpoints that only differ in the other mixers."""
    names = set(model.placement(placement))
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        if ".mixers." in key and key.split(".mixers.")[1].split(".")[0] not in names:
            continue
        h.update(key.encode())
        h.update(tensor_hash(tensor))
    return h.hexdigest()[:16]


def load_or_make_traces(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    n: int,
    length: int,
    prompt_tokens: int,
    temperature: float,
    seed: int,
    directory: Path | None = None,
    placement: str = "all-fa",
) -> TextSet:
    """Teacher traces from the cache directory, generated and saved (atomically) when missing."""
    key = _hash(
        reference_fingerprint(model, placement),
        placement,
        str(n),
        str(length),
        str(prompt_tokens),
        str(temperature),
        str(seed),
        _hash(*texts),
    )
    directory = Path(directory) if directory is not None else cache_dir() / "placement"
    path = directory / f"traces-{key}.safetensors"
    if path.is_file():
        ids = load_file(str(path))["ids"]
    else:
        prompts = token_rows(texts, tokenizer, n, prompt_tokens, seed)
        ids = sample_traces(model, prompts, length - prompt_tokens, placement, temperature, seed)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"ids": ids.contiguous()}, str(tmp), metadata={"placement": placement, "seed": str(seed)})
        tmp.replace(path)
    return TextSet("trace", ids, score_from=prompt_tokens)


# ----------------------------------------------------------------------------------------------- needles


def make_needles(
    texts: Sequence[str], tokenizer, lengths: Sequence[int], needles_per_sequence: int = 3, seed: int = 0
) -> NeedleSet:
    """One haystack per length: held-out prose with passkey sentences at evenly spread depths, then one query
    per needle. Pieces are tokenised separately and concatenated, so the answer spans are exact token
    positions."""
    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler: list[int] = []
    for text in texts:
        filler.extend(enc(text))
        if len(filler) >= 2 * max(lengths):
            break
    sequences, answers, depths = [], [], []
    for length in lengths:
        colors = rng.sample(COLORS, needles_per_sequence)
        codes = [f"{rng.randrange(10000, 100000)}" for _ in colors]
        # The code is tokenised on its own (digits only) in needle and query alike, so the scored tokens are
        # the digits and never the whitespace before them.
        answer_ids = [enc(k) for k in codes]
        needles = [
            enc(f" The secret code of the {c} door is ") + a + enc(". ")
            for c, a in zip(colors, answer_ids, strict=True)
        ]
        prefixes = [enc(f"\n\nThe secret code of the {c} door is ") for c in colors]
        query_len = sum(len(p) + len(a) for p, a in zip(prefixes, answer_ids, strict=True))
        hay_len = length - query_len - sum(len(x) for x in needles)
        if hay_len < 16:
            raise ValueError(f"needle length {length} is too short for {needles_per_sequence} needles")
        start = rng.randrange(0, len(filler) - hay_len) if len(filler) > hay_len else 0
        hay = filler[start : start + hay_len]
        spots = [round(hay_len * (i + 0.5) / needles_per_sequence) for i in range(needles_per_sequence)]
        seq: list[int] = []
        prev, seq_depths = 0, []
        for spot, needle in zip(spots, needles, strict=True):
            seq.extend(hay[prev:spot])
            seq_depths.append(round(len(seq) / length, 3))
            seq.extend(needle)
            prev = spot
        seq.extend(hay[prev:])
        spans = []
        order = list(range(needles_per_sequence))
        rng.shuffle(order)  # ask in a different order than inserted, so recency alone does not answer
        for j in order:
            seq.extend(prefixes[j])
            spans.append((len(seq), len(seq) + len(answer_ids[j])))
            seq.extend(answer_ids[j])
        sequences.append(torch.tensor(seq, dtype=torch.long))
        answers.append(spans)
        depths.append([seq_depths[j] for j in order])
    return NeedleSet(sequences, answers, depths)


# ----------------------------------------------------------------------------------------------- multiple
# choice


def load_choices(path: str | Path, tokenizer) -> ChoiceSet:
    """JSONL rows ``{"context"|"question": str, "choices": [str, ...], "answer"|"label": int}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice file not found: {path}")
    items = []
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            context = row["context"] if "context" in row else row["question"]
            choices = row["choices"]
            answer = int(row["answer"] if "answer" in row else row["label"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{i + 1}: expected {{context, choices, answer}} ({err!r})") from err
        if not isinstance(choices, list) or len(choices) < 2 or not 0 <= answer < len(choices):
            raise ValueError(f"{path}:{i + 1}: need >= 2 choices and 0 <= answer < len(choices)")
        ctx = enc(context)
        if not ctx:
            raise ValueError(f"{path}:{i + 1}: empty context")
        items.append((ctx, [enc(c if c[:1].isspace() else " " + c) for c in choices], answer))
    if not items:
        raise ValueError(f"{path}: no items")
    return ChoiceSet(path.stem, items)
