"""The training config: files, ``--set`` overrides and the saved ``train_config.json`` go through one pydantic
schema; every bad key or value is an error that names it, on the CLI a message rather than a traceback."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

import supernet
from supernet.cli import app
from supernet.training.config import DataConfig, TrainConfig, load_train_config
from supernet.training.data import _fingerprint

DEMO_CONFIG = supernet.DEMO_DIR / "train.yaml"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim: {stpes: 3}\n", r"optim\.stpes: Extra inputs are not permitted \(valid: steps, batch_size"),
        ("optimiser: {steps: 3}\n", r"optimiser: Extra inputs .*valid: model, data, sampling"),
        ("run: {autocast: fp16}\n", r"run\.autocast: Input should be 'none' or 'bf16' \(got 'fp16'\)"),
        ("run: {parallel: fsdp}\n", r"run\.parallel: Input should be 'ddp' or 'fsdp2' \(got 'fsdp'\)"),
        ("optim: {schedule: linear}\n", r"optim\.schedule: .*'cosine' or 'constant' \(got 'linear'\)"),
        ("optim: {trainable: trunk}\n", r"optim\.trainable: .*\(got 'trunk'\)"),
        ("sampling: {strategy: random}\n", r"sampling\.strategy: .*'uniform', 'weighted' or 'layout'"),
        ("sampling: {mixers: [fa, mamba]}\n", r"sampling\.mixers\.1: .*\(got 'mamba'\)"),
        ("sampling: {weights: {mamba: 1}}\n", r"sampling\.weights\.mamba\.\[key\]: .*\(got 'mamba'\)"),
        ("sampling: {fa_mix_range: [5, 2]}\n", r"sampling\.fa_mix_range: expected \[low, high\].*\[5, 2\]"),
        ("sampling: {fa_mix_prob: 0.6, presets: [{placement: all-gdn, prob: 0.5}]}\n", r"sum to 1\.1; at most 1"),
        ("sampling: {presets: [{placement: all-gdn}]}\n", r"sampling\.presets\.0\.prob: Field required"),
        ("blockwise: {mixers: [gdn, fa]}\n", r"blockwise\.mixers: 'fa' is the teacher's attention itself"),
        ("teacher_cache: {enabled: maybe}\n", r"teacher_cache\.enabled: .*\(got 'maybe'\)"),
        ("data: {seq_len: 1}\n", r"data\.seq_len: Input should be greater than or equal to 2 \(got 1\)"),
        ("optim: {lr: fast}\n", r"optim\.lr: Input should be a valid number.*\(got 'fast'\)"),
        ("- optim\n", r"expected a mapping of sections"),
        ("optim: {lr: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_keys_and_values_are_errors_that_name_them(tmp_path, text, message):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_train_config(path)


def test_values_are_converted_and_overrides_apply_on_top(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 3e-4}\nloss:\nsampling: {strategy: uniform, mixers: [fa, gdn]}\n")
    cfg = load_train_config(path, ["optim.steps=7", "model.build.lora_rank=16", "sampling.weights.gdn=2"])
    assert cfg.optim.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string
    assert cfg.optim.steps == 7 and cfg.model.build == {"lora_rank": 16} and cfg.sampling.weights == {"gdn": 2.0}
    assert cfg.loss == TrainConfig().loss  # an empty section takes every default
    toml = tmp_path / "c.toml"
    toml.write_text('[sampling]\nstrategy = "layout"\n[loss]\nreverse_kl = 0.5\n')
    assert load_train_config(toml).loss.reverse_kl == 0.5
    with pytest.raises(ValueError, match=r"optim\.stpes: Extra inputs"):
        load_train_config(path, ["optim.stpes=3"])
    with pytest.raises(ValueError, match=r"--set 'optim\.steps': expected section\.key=value"):
        load_train_config(path, ["optim.steps"])
    with pytest.raises(ValueError, match=r"--set 'optim=3': expected section\.key=value"):
        load_train_config(path, ["optim=3"])
    with pytest.raises(ValueError, match=r"--set 'optim\.lr\.x=1': optim\.lr is not a section"):
        load_train_config(path, ["optim.lr.x=1"])


def test_the_saved_json_reads_back_exactly_in_the_format_runs_have_always_written(tmp_path):
    cfg = load_train_config(DEMO_CONFIG)
    saved = json.loads(json.dumps(cfg.to_dict()))  # what <run.out>/train_config.json holds
    assert TrainConfig.from_dict(saved) == cfg and TrainConfig.from_dict(saved).to_dict() == saved
    # Plain JSON lists and objects, as the dataclass version of this config wrote them.
    assert saved["sampling"]["fa_mix_range"] == [4, 12] and saved["optim"]["betas"] == [0.9, 0.95]
    assert saved["sampling"]["presets"][0] == {"placement": "all-swa", "prob": 0.05}
    assert saved["teacher_cache"] == {"enabled": False, "dir": None, "batch_size": 4}


def test_the_data_fingerprint_is_unchanged_so_existing_runs_resume():
    """``--resume`` reuses a run's packed data only while this hash holds: it must stay the hash of the same
    JSON object it has always been (the data section's fields plus the tokenizer's size and class)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(supernet.DEMO_DIR)
    data = load_train_config(DEMO_CONFIG).data
    legacy = {"sources": ["demo"], "text_field": "text", "seq_len": 1024, "val_fraction": 0.02,
              "max_train_tokens": 2000000, "max_val_tokens": 65536, "seed": 0,
              "vocab": len(tokenizer), "tok": type(tokenizer).__name__}
    expected = hashlib.sha256(json.dumps(legacy, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert _fingerprint(data, tokenizer) == expected
    assert _fingerprint(DataConfig(seq_len=1024), tokenizer) != expected


def test_cli_reports_a_bad_override_as_a_message(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(DEMO_CONFIG.read_text())
    for override, message in [("optim.stpes=3", "optim.stpes: Extra inputs are not permitted"),
                              ("run.autocast=fp16", "run.autocast: Input should be 'none' or 'bf16' (got 'fp16')"),
                              ("optim.steps", "expected section.key=value")]:
        res = CliRunner().invoke(app, ["train", str(config), "--set", override])
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
        assert message in res.output and "Traceback" not in res.output
