"""Checkpoints: bit-exact round trips, and loud, named failures for anything broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from supernet.checkpoint import WEIGHTS, CheckpointError, load_supernet, save_supernet
from supernet.convert import build_from_teacher
from tests.core.helpers import perturbed


def assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("delta", [True, False])
def test_save_load_is_bit_exact(tiny_supernet, tmp_path: Path, delta: bool) -> None:
    model = perturbed(tiny_supernet, seed=11)
    save_supernet(model, tmp_path, delta=delta)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_supernet(tmp_path)
    assert_same_weights(model, loaded)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids, "fa,swa,gdn,kda").logits, loaded(ids, "fa,swa,gdn,kda").logits)


def test_bf16_storage_rounds_each_weight_once(tiny_supernet, tmp_path: Path) -> None:
    """A bf16 checkpoint (the shipped demo's storage) loads back as exactly the bf16-rounded fp32 weights."""
    model = perturbed(tiny_supernet, seed=13)
    save_supernet(model, tmp_path, delta=False, dtype=torch.bfloat16)
    with open(tmp_path / WEIGHTS, "rb") as fh:  # half the bytes of fp32 (plus the header)
        assert len(fh.read()) < 0.6 * sum(v.numel() * 4 for v in model.state_dict().values())
    loaded = load_supernet(tmp_path)
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16).float()), key


def test_full_mixer_weights_round_trip(tiny_teacher, tmp_path: Path) -> None:
    model = perturbed(build_from_teacher(tiny_teacher, mixer_weights="full"), seed=12)
    save_supernet(model, tmp_path)
    assert_same_weights(model, load_supernet(tmp_path))


def test_delta_checkpoint_holds_only_mixer_tensors(tiny_supernet_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_supernet_dir / WEIGHTS), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and all(".mixers." in k for k in keys)


@pytest.fixture()
def ckpt(tiny_supernet_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_supernet_dir, dst)
    return dst


def test_truncated_weights_fail_clearly(ckpt: Path) -> None:
    path = ckpt / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_supernet(ckpt)


def test_flipped_bytes_name_the_tensor(ckpt: Path) -> None:
    path = ckpt / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor '.*' fails its checksum"):
        load_supernet(ckpt)


def test_config_mismatch_names_the_tensor(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["lora_rank"] = cfg["lora_rank"] * 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor '.*lora.*' has shape"):
        load_supernet(ckpt)


def test_bad_config_field_is_named(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    cfg["window_size"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="window_size"):
        load_supernet(ckpt)
    cfg["hidden_size"] = 64
    del cfg["window_size"]
    cfg["mixer_weights"] = "shared"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mixer_weights"):
        load_supernet(ckpt)


def test_missing_tensor_is_named(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / WEIGHTS))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(ckpt / WEIGHTS), metadata={"format": "pt", "kind": "delta"})
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_supernet(ckpt)
