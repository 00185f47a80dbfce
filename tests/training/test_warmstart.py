"""The streamed, early-stopped warm start: it stops each (layer, mixer) on a held-out plateau keeping its best
weights, records the per-layer table, and a run killed between chunks resumes to exactly the weights of an
uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from supernet.training.config import TrainConfig
from supernet.training.trainer import Trainer, train
from supernet.training.warmstart import WarmStart
from tests.training.test_training import (
    kill_run_at_checkpoint,
    run_train,
    tiny_config,
    trainable,
    write_config,
)


def warm_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == "blockwise"]


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best_weights(tmp_path, tiny_supernet_dir):
    cap = 400
    # min_delta 0.5 asks every evaluation for a 50% improvement, so plateaus come after a few chunks.
    cfg = TrainConfig.from_dict(
        tiny_config(
            tmp_path,
            tiny_supernet_dir,
            blockwise={"steps": cap, "steps_per_chunk": 4, "chunk_sequences": 8, "patience": 1, "min_delta": 0.5},
            optim={"steps": 0},
        )
    )
    trainer = Trainer(cfg)
    warm = WarmStart(trainer)
    progress = warm.run()
    assert len(progress) == 4 * 3
    for p in progress:
        assert p.done and p.early, p  # every unit ended on a plateau ...
        assert p.steps < cap and p.drops == 1, p  # ... long before the cap, after one lr cut
        assert p.best <= p.initial, p
        # the weights left in the model are the best ones seen, not the last
        assert warm.held_out_error(p.layer, p.mixer) == pytest.approx(p.best, rel=1e-6)
    records = warm_records(cfg.out)
    assert {(r["layer"], r["mixer"]) for r in records} == {(p.layer, p.mixer) for p in progress}
    assert all(r["tokens"] == r["steps"] * 4 * 32 for r in records)  # batch 4 x seq_len 32


def test_warm_start_killed_between_chunks_resumes_exactly(tmp_path, tiny_supernet_dir):
    blockwise = {"steps": 120, "steps_per_chunk": 2, "chunk_sequences": 8, "min_delta": 0.0, "patience": 1000}
    ref = tiny_config(tmp_path / "ref", tiny_supernet_dir, blockwise=blockwise, optim={"steps": 2})
    train(TrainConfig.from_dict(ref))

    cfg = tiny_config(tmp_path / "killed", tiny_supernet_dir, blockwise=blockwise, optim={"steps": 2})
    path = write_config(tmp_path / "killed.yaml", cfg)
    out = Path(cfg["run"]["out"])
    killed_at = kill_run_at_checkpoint(path, out, "step-000000-warm-00005")
    assert "warm" in killed_at and not (out / "final").exists()
    run_train(path, "--resume")
    a, b = trainable(Path(ref["run"]["out"]) / "final"), trainable(out / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
    ref_table = {(r["layer"], r["mixer"]): r for r in warm_records(Path(ref["run"]["out"]))}
    for r in warm_records(out)[-len(ref_table) :]:
        assert r["best"] == ref_table[(r["layer"], r["mixer"])]["best"]
        assert r["tokens"] == 120 * 4 * 32
