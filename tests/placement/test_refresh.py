"""`supernet place refresh`: a presets file re-measured on retrained weights keeps its placements and speed-ups
and gets exactly the numbers `place eval` measures on the new checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from placement.evaluate import EvalSettings
from placement.store import checkpoint_hash
from supernet.cli import app
from tests.placement.conftest import make_tiny_checkpoint

runner = CliRunner()
SETTINGS = EvalSettings(trace_sequences=2, trace_length=48, trace_prompt=12, kl_sequences=2, kl_length=48,
                        needle_lengths=(300,))
OPTIONS = ["--trace-sequences", "2", "--trace-length", "48", "--kl-sequences", "2", "--needle-lengths", "300",
           "--sources", "demo:shakespeare"]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """Other weights of the same architecture: what a re-run of the training recipe produces."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("retrained") / "ckpt", seed=7)


def presets_file(path, eval_text: str):
    path.write_text(yaml.safe_dump({
        "default": "all-fa",
        "cost": {"context": 1024, "batch": 2, "device": "H100", "model": "analytic:h100-sxm"},
        "quality": {"weights": {"trace_loglik": 1.0, "needle_acc": 1.0}, "eval": eval_text, "checkpoint": "old"},
        "presets": [
            {"name": "all-fa", "placement": "fa*4", "speedup": 1.0, "measured_quality": -9.0},
            {"name": "fast-2x", "placement": "fa,gdn,swa,kda", "speedup": 2.0, "predicted_quality": -1.0,
             "measured_quality": -9.0, "metrics": {"kl": 9.0}, "draft": "all-fa", "speculative_from_context": 512,
             "speculative_measured": [{"context": 64, "batch": 1, "speedup": 1.2, "acceptance": 0.5,
                                       "tokens_per_step": 2.0, "draft": "all-fa"}]},
        ],
    }))
    return path


def test_refresh_remeasures_on_the_new_weights(retrained, tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERNET_CACHE", str(tmp_path / "cache"))
    src, out, db = presets_file(tmp_path / "p.yaml", SETTINGS.describe()), tmp_path / "new.yaml", tmp_path / "r.db"
    done = runner.invoke(app, ["place", "refresh", "--model", str(retrained), "--presets", str(src), "--out",
                               str(out), "--db", str(db), *OPTIONS])
    assert done.exit_code == 0, done.output
    new = yaml.safe_load(out.read_text())
    old = yaml.safe_load(src.read_text())
    assert [(p["name"], p["placement"], p["speedup"]) for p in new["presets"]] == [
        (p["name"], p["placement"], p["speedup"]) for p in old["presets"]]
    assert new["quality"]["checkpoint"] == checkpoint_hash(retrained) and new["default"] == "all-fa"

    # the numbers are the ones `place eval` reports for the new checkpoint (served from the same database)
    args = ["place", "eval", "--model", str(retrained), "--placement", "fa*4", "--placement", "fa,gdn,swa,kda",
            "--db", str(db), *OPTIONS]
    evaluated = runner.invoke(app, args)
    assert evaluated.exit_code == 0, evaluated.output
    rows = [json.loads(line) for line in evaluated.output.splitlines() if line.startswith("{")]
    for preset, row in zip(new["presets"], rows, strict=True):
        assert preset["metrics"] == pytest.approx({k: v for k, v in row.items() if k != "placement"}, abs=1e-5)
        assert preset["measured_quality"] == pytest.approx(row["trace_loglik"] + row["needle_acc"], abs=2e-5)
        assert set(preset["needle_acc_by_length"]) == {300}
    fast = new["presets"][1]
    assert fast["metrics"]["kl"] > 0 and new["presets"][0]["metrics"]["kl"] == 0.0
    # the surrogate's prediction and the speculative measurements described the old weights; a set draft stays
    assert fast.get("predicted_quality") is None and not fast.get("speculative_measured")
    assert fast["draft"] == "all-fa" and fast["speculative_from_context"] == 512


def test_refresh_refuses_other_evaluation_settings(retrained, tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERNET_CACHE", str(tmp_path / "cache"))
    other = EvalSettings(needle_lengths=(2048, 4096)).describe()
    src = presets_file(tmp_path / "p.yaml", other)
    before = src.read_text()
    done = runner.invoke(app, ["place", "refresh", "--model", str(retrained), "--presets", str(src), *OPTIONS])
    assert done.exit_code == 2
    assert "differ from the file's" in " ".join(done.output.split()) and src.read_text() == before
