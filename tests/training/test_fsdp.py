"""FSDP2 (``run.parallel: fsdp2``): 2 gloo processes match 1, checkpoints keep the unsharded format, and a run
resumes from an FSDP2 checkpoint to the weights it would have reached uninterrupted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from supernet.training.config import TrainConfig
from supernet.training.trainer import train
from tests.training.test_training import losses, run_train, tiny_config, trainable, write_config

STEPS = 6


def evals(path: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if r["phase"] == "eval"}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def assert_same_updates(start: dict, one: dict, other: dict, rel: float) -> None:
    """Weight updates agree as a whole (see test_torchrun_two_processes_match_one for why relative L2)."""
    moved = 0
    for name in one:
        update1, update2 = one[name] - start[name], other[name] - start[name]
        scale = float(update1.norm())
        if scale == 0.0:
            assert float(update2.norm()) == 0.0, name
            continue
        moved += 1
        assert float((update2 - update1).norm()) <= rel * scale, name
    assert moved > 0


def test_fsdp2_two_processes_match_one_and_resume(tmp_path, tiny_supernet_dir):
    """Per-row mixers make ranks use different parameters in the same step: without FSDP2's unused-parameter
    reduce-scatter the gradients of different mixers get summed together and the 2-process updates come out
    O(1) wrong. Gradient accumulation (no-sync micro-batches), the teacher in the loop (the sharded model's
    own all-FA placement), mid-run and final evaluation (gathered onto rank 0) all run here."""
    sections = {
        "optim": {"steps": STEPS, "grad_accum": 2},
        "teacher_cache": {"enabled": False},
        "run": {"save_every": 3, "keep_last": 5, "eval_every": 3, "eval_placements": ["all-fa", "all-gdn"]},
    }
    ref = tiny_config(tmp_path / "one", tiny_supernet_dir, **sections)
    train(TrainConfig.from_dict(ref))
    cfg = tiny_config(tmp_path / "fsdp", tiny_supernet_dir, **sections)
    cfg["run"]["parallel"] = "fsdp2"
    path = write_config(tmp_path / "fsdp.yaml", cfg)
    run_train(path, world=2, timeout=600)
    one, two = Path(ref["run"]["out"]), Path(cfg["run"]["out"])

    l1, l2 = losses(one / "metrics.jsonl"), losses(two / "metrics.jsonl")
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4, abs=1e-5), step
    start, final1, final2 = (
        trainable(tiny_supernet_dir),
        trainable(one / "final"),
        trainable(two / "final"),
    )
    assert_same_updates(start, final1, final2, 1e-3)
    e1, e2 = evals(one / "metrics.jsonl"), evals(two / "metrics.jsonl")
    assert sorted(e1) == sorted(e2) == [3, STEPS]
    for step in e1:
        assert e2[step]["all-gdn/kl"] == pytest.approx(e1[step]["all-gdn/kl"], rel=1e-3), step
        assert e2[step]["all-fa/kl"] < 1e-6

    # The checkpoint is the unsharded single-process format: same tensors, same optimiser layout.
    c1, c2 = one / "checkpoints" / "step-000003", two / "checkpoints" / "step-000003"
    for name in ("params.safetensors", "optim.safetensors"):
        t1, t2 = tensors(c1 / name), tensors(c2 / name)
        assert sorted(t1) == sorted(t2) and len(t1) > 0
        assert all(t1[k].shape == t2[k].shape for k in t1), name
    s1, s2 = (json.loads((c / "state.json").read_text()) for c in (c1, c2))
    assert s2["optimizer_groups"] == s1["optimizer_groups"] and s2["step"] == 3
    p1, p2 = tensors(c1 / "params.safetensors"), tensors(c2 / "params.safetensors")
    assert_same_updates({k: start[k] for k in p1}, p1, p2, 1e-3)

    # Resume from the FSDP2 checkpoint at step 3 (drop what came after it): the same final weights as the
    # uninterrupted FSDP2 run, so the sharded optimiser state was restored, not restarted.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:06d}")
    (resumed / "checkpoints" / "latest").write_text("step-000003\n")
    cfg["run"]["out"] = str(resumed)
    run_train(write_config(tmp_path / "resume.yaml", cfg), "--resume", world=2, timeout=600)
    final3 = trainable(resumed / "final")
    for name in final2:
        torch.testing.assert_close(final3[name], final2[name], rtol=1e-6, atol=1e-7)
    assert losses(resumed / "metrics.jsonl")[STEPS] == pytest.approx(l2[STEPS], rel=1e-6)

