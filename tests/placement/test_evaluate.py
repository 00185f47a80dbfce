"""Metrics on a real (tiny) supernet checkpoint, the results database and the evaluation data sets."""

from __future__ import annotations

import json

import pytest
import torch

from placement import data as D
from placement.evaluate import (
    EvalData,
    EvalSettings,
    Evaluator,
    choice_accuracy,
    combine,
    parse_quality,
    token_logprobs,
)
from placement.store import Key, ResultStore, checkpoint_hash
from supernet.checkpoint import load_supernet


@pytest.fixture(scope="module")
def opened(tiny_ckpt):
    from transformers import AutoTokenizer

    return load_supernet(tiny_ckpt), AutoTokenizer.from_pretrained(str(tiny_ckpt)), checkpoint_hash(tiny_ckpt)


@pytest.fixture(scope="module")
def texts():
    return D.heldout_texts(["demo:shakespeare"])


def test_needles_are_exact_token_spans(opened, texts):
    _, tok, _ = opened
    needles = D.make_needles(texts, tok, (300, 600), needles_per_sequence=3, seed=1)
    assert needles.lengths == [300, 600]
    for seq, spans, depths in zip(needles.sequences, needles.answers, needles.depths, strict=True):
        text = tok.decode(seq)
        for first, end in spans:
            code = tok.decode(seq[first:end])
            assert code.isdigit() and len(code) == 5
            # the code appears twice: in its needle inside the haystack and after its query at the end
            assert text.count(f"door is {code}") == 2
        assert all(0 < d < 1 for d in depths) and len(set(depths)) == 3
    assert needles.data_hash == D.make_needles(texts, tok, (300, 600), 3, seed=1).data_hash
    assert needles.data_hash != D.make_needles(texts, tok, (300, 600), 3, seed=2).data_hash


def test_traces_generated_once_and_reused(opened, texts, tmp_path):
    model, tok, _ = opened
    kw = dict(n=2, length=40, prompt_tokens=10, temperature=1.0, seed=0, directory=tmp_path)
    a = D.load_or_make_traces(model, tok, texts, **kw)
    files = list(tmp_path.glob("traces-*.safetensors"))
    assert len(files) == 1 and a.ids.shape == (2, 40) and a.score_from == 10
    mtime = files[0].stat().st_mtime_ns
    b = D.load_or_make_traces(model, tok, texts, **kw)
    assert torch.equal(a.ids, b.ids) and files[0].stat().st_mtime_ns == mtime
    # the prompts are held-out text; the continuation is the reference's sample
    prompts = D.token_rows(texts, tok, 2, 10, seed=0)
    assert torch.equal(a.ids[:, :10], prompts)


def test_metrics_and_database_reuse(opened, texts, tmp_path):
    model, tok, ckpt = opened
    settings = EvalSettings(
        trace_sequences=2,
        trace_length=48,
        trace_prompt=8,
        kl_sequences=2,
        kl_length=48,
        needle_lengths=(300,),
        needles_per_sequence=2,
    )
    data = EvalData(
        traces=D.load_or_make_traces(
            model, tok, texts, n=2, length=48, prompt_tokens=8, temperature=1.0, seed=0, directory=tmp_path
        ),
        kl_text=D.TextSet("heldout", D.token_rows(texts, tok, 2, 48, seed=0, offset=4)),
        needles=D.make_needles(texts, tok, (300,), 2, seed=0),
    )
    metrics = ["trace_loglik", "kl", "needle_acc", "needle_loglik"]
    with ResultStore(tmp_path / "r.sqlite") as store:
        ev = Evaluator(model, ckpt, store, settings, data)
        fa = ev.evaluate("all-fa", metrics)
        assert fa["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference against itself
        manual = token_logprobs(model, data.traces.ids, "all-fa")[:, 7:].mean()
        assert fa["trace_loglik"] == pytest.approx(float(manual), abs=1e-6)
        assert 0.0 <= fa["needle_acc"] <= 1.0
        gdn = ev.evaluate("all-gdn", metrics)
        seq, spans = data.needles.sequences[0], data.needles.answers[0]
        with torch.no_grad():  # independent: full logits, per-span digit accuracy
            logits = model(seq[None], "all-gdn").logits[0]
        manual = [float((logits[a - 1 : b - 1].argmax(-1) == seq[a:b]).float().mean()) for a, b in spans]
        assert gdn["needle_acc"] == pytest.approx(sum(manual) / len(manual))
        assert gdn["kl"] > 1e-4 and gdn["trace_loglik"] != fa["trace_loglik"]
        computed = ev.computed
        assert computed == 8  # needle_acc and needle_loglik share one pass and are stored together
        assert (
            ev.evaluate("gdn*4", metrics) == gdn
        )  # same placement, other spelling: read back, not recomputed
        assert ev.computed == computed
    with ResultStore(tmp_path / "r.sqlite") as store:  # a new process/evaluator reads the same rows
        ev2 = Evaluator(model, ckpt, store, settings, data)
        assert ev2.evaluate("all-gdn", metrics) == gdn and ev2.computed == 0
        # other data => other key => recomputed
        ev3 = Evaluator(
            model, ckpt, store, settings, EvalData(traces=D.TextSet("trace", data.traces.ids[:1], 8))
        )
        ev3.evaluate("all-gdn", ["trace_loglik"])
        assert ev3.computed == 1
        rows = store.computations()
        assert len(rows) == len({r[:4] for r in rows}) == 9
        value, detail = store.get(Key(ckpt, "gdn*4", "needle_acc", data.needles.data_hash))
        assert value == gdn["needle_acc"] and len(detail["needles"]) == 2


def test_multiple_choice_scoring(opened, tmp_path):
    model, tok, _ = opened
    rows = [
        {"context": "The king said", "choices": ["yes", "no", "perhaps"], "answer": 0},
        {"question": "To be or not", "choices": ["to be", "a fish"], "label": 1},
    ]
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    choices = D.load_choices(path, tok)
    acc, detail = choice_accuracy(model, choices, "all-fa")
    expected = 0
    for context, options, answer in choices.items:  # independent recomputation with one call per option
        scores = []
        for option in options:
            ids = torch.tensor([context + option])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids, "all-fa").logits[0], -1)
            scores.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(option)))
        expected += int(scores.index(max(scores)) == answer)
    assert acc == expected / 2 and detail["items"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: need >= 2 choices"):
        D.load_choices(bad, tok)


def test_quality_weights():
    assert parse_quality(None) == {"trace_loglik": 1.0, "needle_acc": 1.0}
    w = parse_quality("trace_loglik=1,kl=-2")
    assert combine({"trace_loglik": -2.0, "kl": 0.5}, w) == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="unknown metric 'ppl'"):
        parse_quality("ppl=1")


def test_store_transactions_and_checkpoint_hash(tiny_ckpt, tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        key = Key("c", "fa*4", "kl", "d")
        with pytest.raises(RuntimeError):
            with store.transaction() as c:
                c.execute(
                    "INSERT INTO results VALUES (?,?,?,?,?,?,?,?)", ("c", "fa*4", "kl", "d", 1.0, "{}", 0, 0)
                )
                raise RuntimeError("killed mid-transaction")
        assert store.get(key) is None  # rolled back
        store.put(key, 0.25, {"a": 1})
        assert store.get(key) == (0.25, {"a": 1})
    h = checkpoint_hash(tiny_ckpt)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("config.json", "model.safetensors"):
        (copy / f).write_bytes((tiny_ckpt / f).read_bytes())
    assert checkpoint_hash(copy) == h
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(raw))
    assert checkpoint_hash(copy) != h
