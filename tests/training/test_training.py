"""Distillation training end to end on the tiny random teacher: losses fall, torchrun matches one process, a
killed run resumes to the same weights, the teacher cache equals the in-loop teacher, and `supernet eval`
reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from supernet.checkpoint import CheckpointError, load_supernet
from supernet.training.config import TrainConfig
from supernet.training.state import complete_checkpoints, load_training_state, save_training_state
from supernet.training.step import DistillStep
from supernet.training.trainer import Trainer, train
from tests.conftest import TINY_TEXT, free_port

REPO = Path(__file__).resolve().parents[2]


def write_corpus(directory: Path, docs: int = 24) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    words = TINY_TEXT.split()
    rng = np.random.default_rng(0)
    for i in range(docs):
        start = int(rng.integers(0, 40))
        (directory / f"doc{i:02d}.txt").write_text(" ".join(words[start : start + 160]))
    return directory


def tiny_config(tmp_path: Path, model_dir: Path, **sections) -> dict:
    cfg = {
        "model": {"checkpoint": str(model_dir)},
        "data": {"sources": [str(write_corpus(tmp_path / "corpus"))], "seq_len": 32, "val_fraction": 0.2},
        "blockwise": {"steps": 0, "batch_size": 4},
        "optim": {"steps": 10, "batch_size": 4, "lr": 3.0e-3, "warmup_steps": 2},
        "run": {
            "out": str(tmp_path / "run"),
            "save_every": 5,
            "progress": False,
            "eval_placements": [],
            "threads": 1,
        },
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def trainable(model_dir: Path) -> dict[str, torch.Tensor]:
    model = load_supernet(model_dir)
    return {k: v for k, v in model.state_dict().items() if ".mixers." in k}


def losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("phase") == "train":
            out[r["step"]] = r["loss"]
    return out


def kill_run_at_checkpoint(config: Path, out: Path, at_least: str) -> str:
    """Start `supernet train config` in a subprocess, SIGKILL it as soon as its newest checkpoint's name sorts
    at or after ``at_least``, and return that name."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "supernet.cli", "train", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= at_least:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run finished before reaching {at_least} could kill it: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return latest.read_text().strip()


def run_train(config: Path, *args: str, world: int = 1, timeout: int = 240) -> None:
    """`supernet train CONFIG ARGS` in a fresh process, as a user runs it (under torchrun with ``world`` > 1
    processes); a failed run fails the test with its stderr."""
    launcher = ["torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(free_port()), "-m"]
    proc = subprocess.run(
        [sys.executable, "-m", *(launcher if world > 1 else []), "supernet.cli", "train", str(config), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@torch.no_grad()
def placement_loss(trainer: Trainer, placement: str, rows: np.ndarray) -> float:
    """The distillation loss (activation + KL) of one whole-model placement on fixed training rows."""
    ids = torch.from_numpy(trainer.data.train[rows]).long()
    targets = trainer.targets_source().get(rows, ids)
    step = DistillStep(trainer.model, trainer.cfg)
    loss, _, _ = step(ids, [trainer.model.placement(placement)] * len(rows), targets)
    return float(loss)


def losses_before_and_after_training(placements: tuple[str, ...], tmp_path: Path, model_dir: Path, **sections):
    """Each placement's distillation loss on fixed training rows before and after training the tiny config
    with ``sections`` on top, and the trained supernet."""
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, model_dir, **sections))
    probe = np.arange(8)
    trainer = Trainer(cfg)
    before = {p: placement_loss(trainer, p, probe) for p in placements}
    trained = load_supernet(train(cfg, resume=True)["final"])  # resume: the probe trainer made the run directory
    trainer.model.load_state_dict(trained.state_dict())
    return before, {p: placement_loss(trainer, p, probe) for p in placements}, trained


def test_tiny_run_lowers_every_mixer_loss_and_blockwise_lowers_every_layer(tmp_path, tiny_supernet_dir):
    presets = [{"placement": f"all-{m}", "prob": 0.2} for m in ("swa", "gdn", "kda")]
    before, after, _ = losses_before_and_after_training(
        ("all-fa", "all-swa", "all-gdn", "all-kda"),
        tmp_path,
        tiny_supernet_dir,
        blockwise={"steps": 15},
        optim={"steps": 50, "lr": 1.0e-3},
        sampling={"presets": presets},
    )
    for p in ("all-swa", "all-gdn", "all-kda"):
        assert after[p] < before[p], (p, before[p], after[p])
    assert before["all-fa"] == pytest.approx(0.0, abs=1e-4) and after["all-fa"] == pytest.approx(
        0.0, abs=1e-4
    )

    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    blockwise = [r for r in records if r["phase"] == "blockwise"]
    assert {(r["layer"], r["mixer"]) for r in blockwise} == {
        (i, m) for i in range(4) for m in ("swa", "gdn", "kda")
    }
    for r in blockwise:
        assert r["loss_after"] < r["loss_before"], r
    train_records = [r for r in records if r["phase"] == "train"]
    assert len(train_records) == 50 and all(
        k in train_records[-1] for k in ("act_gdn", "act_kda", "tok_per_s")
    )


def test_bf16_autocast_trains_fp32_weights_and_lowers_the_loss(tmp_path, tiny_supernet_dir):
    """``run.autocast: bf16``: forward passes in bf16 autocast, yet the trainable weights (and the saved
    supernet) stay fp32, the warm start lowers every layer's error and the linear mixers' distillation loss
    still falls."""
    presets = [{"placement": f"all-{m}", "prob": 0.3} for m in ("gdn", "kda")]
    before, after, trained = losses_before_and_after_training(
        ("all-gdn", "all-kda"),
        tmp_path,
        tiny_supernet_dir,
        blockwise={"steps": 8},
        optim={"steps": 20, "lr": 1.0e-3},
        sampling={"presets": presets},
        run={"autocast": "bf16", "save_every": 20},
    )
    assert {t.dtype for t in trained.state_dict().values()} == {torch.float32}
    for p in before:
        assert after[p] < before[p], (p, before[p], after[p])
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert all(np.isfinite(v) for v in losses(metrics).values())
    warm = [json.loads(x) for x in metrics.read_text().splitlines() if '"phase": "blockwise"' in x]
    assert warm and all(r["loss_after"] < r["loss_before"] for r in warm)


def test_torchrun_two_processes_match_one(tmp_path, tiny_supernet_dir):
    """Same global batch on 1 and 2 gloo processes: the same loss trajectory and the same weight updates.

    Why these tolerances: the two runs differ only in float summation order (one batched backward vs two
    half-batch backwards averaged by an all-reduce), so gradients agree to ~1e-7 relative. Losses are smooth
    in the weights and keep that agreement (rel 1e-4). Single weights do not: AdamW divides each gradient
    element by its own running RMS, so an element whose gradient is near zero moves by up to ~lr per step in a
    direction set by rounding noise (seen: 1.1e-5 on one weight of thousands). An elementwise atol would be
    either flaky or, set to lr x steps, meaningless. The well-posed check is on the update as a whole: the
    difference between the two runs' weight changes must be tiny relative to the change training made
    (<= 1e-3 in L2 per tensor). A real bug (gradients not averaged, rows split wrongly, a rank's mixer not
    broadcast) makes that ratio O(1)."""
    runs = {}
    for world in (1, 2):
        cfg = tiny_config(
            tmp_path / f"w{world}", tiny_supernet_dir, optim={"steps": 6}, blockwise={"steps": 2}
        )
        run_train(write_config(tmp_path / f"w{world}.yaml", cfg), world=world)
        runs[world] = Path(cfg["run"]["out"])
    one, two = losses(runs[1] / "metrics.jsonl"), losses(runs[2] / "metrics.jsonl")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    p0, p1, p2 = trainable(tiny_supernet_dir), trainable(runs[1] / "final"), trainable(runs[2] / "final")
    moved = 0
    for name in p1:
        update1, update2 = p1[name] - p0[name], p2[name] - p0[name]
        scale = float(update1.norm())
        if scale == 0.0:  # a tensor neither run trains must stay untouched in both
            assert float(update2.norm()) == 0.0, name
            continue
        moved += 1
        assert float((update2 - update1).norm()) <= 1e-3 * scale, name
    assert moved > 0


def test_sigkill_then_resume_reaches_the_uninterrupted_weights(tmp_path, tiny_supernet_dir):
    steps = 40
    ref_cfg = tiny_config(tmp_path / "ref", tiny_supernet_dir, blockwise={"steps": 3}, optim={"steps": steps})
    train(TrainConfig.from_dict(ref_cfg))

    cfg = tiny_config(tmp_path / "killed", tiny_supernet_dir, blockwise={"steps": 3}, optim={"steps": steps})
    path = write_config(tmp_path / "killed.yaml", cfg)
    out = Path(cfg["run"]["out"])
    killed_at = kill_run_at_checkpoint(path, out, "step-000010")
    assert killed_at < f"step-{steps:06d}" and not (out / "final").exists()
    # What a kill can leave behind must never be loaded: a half-written checkpoint directory, and one missing
    # the state.json that is written last.
    (out / "checkpoints" / "step-999999.tmp").mkdir()
    (out / "checkpoints" / "step-999999.tmp" / "params.safetensors").write_bytes(b"\0" * 100)
    (out / "checkpoints" / "step-999998").mkdir()
    with pytest.raises(FileExistsError):
        train(TrainConfig.from_dict(cfg))  # without --resume an existing run is refused
    run_train(path, "--resume")
    ref, resumed = trainable(Path(ref_cfg["run"]["out"]) / "final"), trainable(out / "final")
    for name in ref:
        torch.testing.assert_close(resumed[name], ref[name], rtol=1e-6, atol=1e-7)
    ref_losses, res_losses = (
        losses(Path(ref_cfg["run"]["out"]) / "metrics.jsonl"),
        losses(out / "metrics.jsonl"),
    )
    assert res_losses[steps] == pytest.approx(ref_losses[steps], rel=1e-6)


def test_corrupt_checkpoint_fails_its_checksum_and_is_skipped(tmp_path):
    params = {"w": torch.arange(6.0).reshape(2, 3)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    first = save_training_state(tmp_path, 5, params, opt, {"phase": "train"})
    second = save_training_state(tmp_path, 10, {"w": params["w"] + 1}, opt, {"phase": "train"})
    assert complete_checkpoints(tmp_path) == [second, first]
    p, o, state, _ = load_training_state(second)
    assert state["step"] == 10 and torch.equal(p["w"], params["w"] + 1) and o is not None
    raw = bytearray((second / "params.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (second / "params.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_training_state(second)
    (second / "params.safetensors").write_bytes(bytes(raw[:40]))
    with pytest.raises(CheckpointError, match="params.safetensors"):
        load_training_state(second)


def test_teacher_cache_equals_teacher_in_the_loop(tmp_path, tiny_supernet_dir):
    cached = Trainer(
        TrainConfig.from_dict(tiny_config(tmp_path / "a", tiny_supernet_dir, blockwise={"steps": 1}))
    )
    live = Trainer(
        TrainConfig.from_dict(
            tiny_config(tmp_path / "b", tiny_supernet_dir, teacher_cache={"enabled": False})
        )
    )
    rows = np.array([3, 0, 5, 1])
    ids = torch.from_numpy(cached.data.train[rows]).long()
    a, b = cached.targets_source().get(rows, ids), live.targets_source().get(rows, ids)
    assert torch.equal(a.idx, b.idx)
    torch.testing.assert_close(a.top.float(), b.top.float(), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(a.rest, b.rest, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.outs, b.outs, strict=True):
        torch.testing.assert_close(x, y.float(), atol=2e-3, rtol=2e-3)  # fp16 on disk
    assert (tmp_path / "a" / "run" / "teacher_cache" / "meta.json").is_file()


def test_eval_cli_reports_teacher_and_placements(tmp_path, tiny_supernet_dir):
    from typer.testing import CliRunner

    from supernet.cli import app

    write_corpus(tmp_path / "held")
    out = tmp_path / "eval.json"
    common = [
        "eval",
        "--model",
        str(tiny_supernet_dir),
        "--data",
        str(tmp_path / "held"),
        "--seq-len",
        "32",
        "--max-tokens",
        "512",
    ]
    res = CliRunner().invoke(
        app,
        [
            *common,
            "--placement",
            "all-fa",
            "--placement",
            "all-gdn",
            "--placement",
            "fa,swa,gdn,kda",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "| teacher |" in res.stdout and "| all-gdn | 0/0/4/0 |" in res.stdout
    results = json.loads(out.read_text())["results"]
    assert results["all-fa"]["kl"] < 1e-6
    assert results["all-fa"]["ppl"] == pytest.approx(results["teacher"]["ppl"], rel=1e-5)
    assert results["all-gdn"]["kl"] > 1e-3
    bad = CliRunner().invoke(app, [*common, "--placement", "all-xyz"])
    assert bad.exit_code == 2 and "unknown mixer 'xyz'" in bad.output

    # The model's preset names work as placements: same numbers as the placement they name.
    import shutil

    named = tmp_path / "with_presets"
    shutil.copytree(tiny_supernet_dir, named)
    (named / "presets.yaml").write_text("presets:\n- {name: hybrid-x, placement: 'fa,swa,gdn,kda'}\n")
    common[2] = str(named)
    res = CliRunner().invoke(app, [*common, "--placement", "hybrid-x", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "| hybrid-x | 1/1/1/1 |" in res.stdout
    assert json.loads(out.read_text())["results"]["hybrid-x"] == pytest.approx(results["fa,swa,gdn,kda"])
