"""``supernet export``: a thin checkpoint with only the chosen presets' mixers (no vLLM needed; serving it on
vLLM is tests/vllm/test_vllm_serve.py)."""

from __future__ import annotations

import pytest
from safetensors import safe_open


def test_export_keeps_only_the_presets_mixers(thin_dir, tiny_vllm_supernet):
    from supernet.presets import read_presets

    with safe_open(str(thin_dir / "model.safetensors"), "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    with safe_open(str(tiny_vllm_supernet / "model.safetensors"), "pt") as fh:
        source = set(fh.keys())
    kept = [(0, "kda"), (2, "kda"), (1, "swa"), (3, "swa")] + [(i, "gdn") for i in range(4)]
    assert keys == {k for k in source if any(f"layers.{i}.mixers.{m}." in k for i, m in kept)}
    assert meta["kind"] == "delta"  # the trunk still comes from the teacher
    assert meta["mixers"] == '[["gdn", "kda"], ["swa", "gdn"], ["gdn", "kda"], ["swa", "gdn"]]'
    presets = read_presets(thin_dir / "presets.yaml")
    assert [p.name for p in presets.presets] == ["swa-every-2:kda", "all-gdn"] and presets.default == "swa-every-2:kda"
    assert (thin_dir / "tokenizer.json").is_file()


def test_export_cli_and_its_errors(tiny_vllm_supernet, tmp_path):
    from typer.testing import CliRunner

    from supernet.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["export", "--model", str(tiny_vllm_supernet), "--out", str(tmp_path / "a"),
                             "--preset", "all-kda"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as fh:
        assert {k.split(".")[3] for k in fh.keys() if ".mixers." in k} == {"kda"}
    bad = runner.invoke(app, ["export", "--model", str(tiny_vllm_supernet), "--out", str(tmp_path / "b"),
                              "--preset", "all-nope"])  # fmt: skip
    assert bad.exit_code == 2 and "nope" in bad.output


def test_embedded_loader_refuses_a_thin_checkpoint_by_name(thin_dir):
    from supernet.checkpoint import CheckpointError, load_supernet

    with pytest.raises(CheckpointError, match="missing tensor"):
        load_supernet(thin_dir)
