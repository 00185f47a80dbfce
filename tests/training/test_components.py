"""The pieces under `supernet train`: placement sampling, data sources and packing, the top-k KL."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from supernet.training.config import DataConfig, SamplingConfig, TrainConfig
from supernet.training.data import DataError, pack, prepare_data, read_documents, split_documents
from supernet.training.losses import full_kl, teacher_topk, topk_kl
from supernet.training.sampling import PlacementSampler


def test_uniform_sampling_is_per_step_deterministic_and_covers_every_mixer():
    sampler = PlacementSampler(SamplingConfig(), num_layers=8, seed=3)
    assert sampler.for_step(5, 4) == sampler.for_step(5, 4)
    assert sampler.for_step(5, 4) != sampler.for_step(6, 4)
    counts = Counter(m for step in range(200) for p in sampler.for_step(step, 2) for m in p)
    assert set(counts) == {"fa", "swa", "gdn", "kda"}
    assert max(counts.values()) / min(counts.values()) < 1.2  # 3200 draws: uniform within noise


def test_weighted_layout_and_preset_sampling():
    weighted = PlacementSampler(SamplingConfig(strategy="weighted", weights={"gdn": 3, "swa": 1}), 6, 0)
    counts = Counter(m for s in range(300) for m in weighted.for_step(s, 1)[0])
    assert set(counts) == {"gdn", "swa"} and 2.4 < counts["gdn"] / counts["swa"] < 3.6

    layout = PlacementSampler(SamplingConfig(strategy="layout", mixers=["fa", "gdn"]), 6, 0)
    fa_counts = Counter(layout.for_step(s, 1)[0].count("fa") for s in range(700))
    assert set(fa_counts) == set(range(7))  # every count 0..6 (all-GDN and all-FA too), about equally often
    assert min(fa_counts.values()) > 60

    presets = [{"placement": "all-kda", "prob": 0.25}, {"placement": "fa-every-2:gdn", "prob": 0.25}]
    mixed = PlacementSampler(SamplingConfig(presets=presets, per_row=False), 4, 0)
    drawn = Counter(mixed.for_step(s, 3)[0] for s in range(800))
    assert 150 < drawn[("kda",) * 4] < 250 and 150 < drawn[("gdn", "fa", "gdn", "fa")] < 250
    batch = mixed.for_step(1, 3)
    assert batch[0] == batch[1] == batch[2]  # per_row=False: one placement for the batch


def test_data_sources_split_whole_documents_and_pack(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i in range(5):
        (folder / f"d{i}.txt").write_text(f"text file {i} " * 20)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"json row {i} " * 20}) for i in range(5)))
    import datasets

    parquet = tmp_path / "rows.parquet"
    rows = {"body": [f"parquet row {i} " * 20 for i in range(5)]}
    datasets.Dataset.from_dict(rows).to_parquet(str(parquet))
    docs = read_documents([str(folder)]) + read_documents([str(jsonl), str(parquet)], text_field="body")
    assert len(docs) == 15 and {d.text.split()[0] for d in docs} == {"text", "json", "parquet"}
    train, val = split_documents(docs, 0.2, seed=0)
    assert len(val) == 3 and not {d.name for d in train} & {d.name for d in val}
    with pytest.raises(DataError, match="no field 'text'"):
        read_documents([str(jsonl)])
    with pytest.raises(DataError, match="not found"):
        read_documents([str(tmp_path / "missing.txt")])

    packed = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos=0)
    assert packed.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack([[1] * 50], seq_len=4, eos=None, max_tokens=8).shape == (2, 4)


def test_prepare_data_is_reused_while_its_fingerprint_holds(tmp_path):
    from tests.conftest import make_tiny_tokenizer

    folder = tmp_path / "txt"
    folder.mkdir()
    for i in range(10):
        (folder / f"d{i}.txt").write_text(f"It is a truth universally acknowledged {i}. " * 30)
    tok = make_tiny_tokenizer(384)
    cfg = DataConfig(sources=[str(folder)], seq_len=16, val_fraction=0.2)
    first = prepare_data(cfg, tok, tmp_path / "data")
    assert first.train.shape[1] == 16 and len(first.val) > 0
    assert len((tmp_path / "data" / "val.jsonl").read_text().splitlines()) == 2
    again = prepare_data(cfg, tok, tmp_path / "data")
    assert np.array_equal(first.train, again.train) and again.fingerprint == first.fingerprint
    shorter = DataConfig(sources=[str(folder)], seq_len=8, val_fraction=0.2)
    other = prepare_data(shorter, tok, tmp_path / "data")
    assert other.train.shape[1] == 8


def test_topk_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 40) * 2, torch.randn(2, 5, 40) * 2
    for temperature in (1.0, 2.0):
        top, idx, rest = teacher_topk(teacher, 40, temperature)
        fwd, rev = topk_kl(student, top.float(), idx, rest, temperature)
        exact_fwd = full_kl(student / temperature, teacher / temperature).mean(-1) * temperature**2
        exact_rev = full_kl(teacher / temperature, student / temperature).mean(-1) * temperature**2
        torch.testing.assert_close(fwd, exact_fwd, atol=2e-3, rtol=2e-3)  # fp16 log-probs
        torch.testing.assert_close(rev, exact_rev, atol=2e-3, rtol=2e-3)
    top, idx, rest = teacher_topk(teacher, 8, 1.0)
    fwd, rev = topk_kl(student, top, idx, rest, 1.0)
    assert torch.all(fwd <= full_kl(student, teacher).mean(-1) + 1e-4)
    assert torch.all(fwd > 0) and torch.all(rev > 0)
    same, _ = topk_kl(teacher, *teacher_topk(teacher, 8, 1.0), 1.0)
    assert float(same.abs().max()) < 2e-3


def test_fa_mix_sampling_draws_hybrids_with_the_configured_fa_count():
    sampler = PlacementSampler(SamplingConfig(fa_mix_prob=0.5, fa_mix_range=[4, 6]), 12, 0)
    drawn = [sampler.for_step(s, 1)[0] for s in range(600)]
    fa_counts = Counter(p.count("fa") for p in drawn)
    in_range = sum(fa_counts[c] for c in (4, 5, 6))
    assert 240 < in_range < 420  # ~half the draws (plus uniform ones that land there by chance)
    hybrids = [p for p in drawn if 4 <= p.count("fa") <= 6]
    assert {m for p in hybrids for m in p} == {"fa", "swa", "gdn", "kda"}
    assert len({p.index("fa") for p in hybrids}) > 4  # FA lands at varying layers
    with pytest.raises(ValueError, match="fa_mix_range"):
        TrainConfig.from_dict({"sampling": {"fa_mix_range": [5, 2]}})
