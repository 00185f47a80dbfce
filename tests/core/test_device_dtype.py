"""``--device`` / ``--dtype``: the parser, bf16 models on CPU (every mixer, caches in the right dtypes, logits
within a stated tolerance of fp32), and the generate / eval / train commands taking the options."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from supernet.cache import DeltaState, KVCache, WindowKVCache
from supernet.device import DeviceError, parse_device, parse_dtype, resolve
from supernet.generate import greedy_generate

PLACEMENTS = ["all-fa", "all-swa", "all-gdn", "all-kda", "fa,swa,gdn,kda"]
# bf16 vs fp32 on the tiny model (logits |max| ~ 2.7), measured over 4 random batches of 2 x 24 tokens:
# KL(fp32 || bf16) per token: mean <= 3e-5 (FA/SWA) and <= 8.6e-4 (GDN/KDA), max <= 1.3e-2; mean |logit
# difference| <= 0.006 (FA/SWA), <= 0.026 (GDN/KDA; single logits up to 0.5: their q/k normalisation, decay and
# gates run on bf16 activations before the fp32 scan). Bounds: about 3x the worst measured.
KL_MEAN, KL_MAX, MEAN_ABS = 3e-3, 5e-2, 0.08


def check_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    out, ref = out.float().log_softmax(-1), ref.float().log_softmax(-1)
    kl = (ref.exp() * (ref - out)).sum(-1)
    assert torch.isfinite(out).all()
    assert kl.mean() <= KL_MEAN and kl.max() <= KL_MAX, (kl.mean(), kl.max())
    assert (out - ref).abs().mean() <= MEAN_ABS


def test_parse():
    assert resolve("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert parse_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert parse_dtype("float32", torch.device("cpu")) is torch.float32
    with pytest.raises(DeviceError, match="--dtype 'fp8': expected auto, float32"):
        parse_dtype("fp8", torch.device("cpu"))
    with pytest.raises(DeviceError, match="--device 'tpu'"):
        parse_device("tpu")
    with pytest.raises(DeviceError, match="--device 'banana'"):
        parse_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device 'cuda': CUDA is not available"):
            parse_device("cuda")


@pytest.fixture(scope="module")
def bf16_pair(tiny_supernet):
    return tiny_supernet.eval(), copy.deepcopy(tiny_supernet).to(torch.bfloat16).eval()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bf16_logits_close_to_fp32(bf16_pair, placement):
    fp32, bf16 = bf16_pair
    ids = torch.randint(0, fp32.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = fp32(ids, placement).logits
        out = bf16(ids, placement).logits
    assert out.dtype is torch.bfloat16
    check_close(out, ref)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bf16_decodes_every_mixer(bf16_pair, placement):
    """Prefill + one-token decode steps in bf16: KV caches bf16, recurrent state fp32, logits near fp32's."""
    fp32, bf16 = bf16_pair
    ids = torch.randint(0, fp32.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    state = bf16.new_state(placement)
    with torch.inference_mode():
        ref = fp32(ids, placement).logits[0]
        steps = [bf16(ids[:, :8], states=[state]).logits[0]]
        steps += [bf16(ids[:, t : t + 1], states=[state]).logits[0] for t in range(8, 12)]
    check_close(torch.cat(steps), ref)
    for layer in state.layers:
        if isinstance(layer, KVCache | WindowKVCache):
            assert layer.k.dtype is torch.bfloat16
        else:
            assert isinstance(layer, DeltaState) and layer.recurrent.dtype is torch.float32
    tokens = greedy_generate(bf16, ids[0].tolist(), placement, 6)
    assert len(tokens) == 6 and all(0 <= t < bf16.config.vocab_size for t in tokens)


def cli(*args: str):
    from supernet.cli import app

    return CliRunner().invoke(app, list(args))


def test_generate_cli_bf16_and_bad_values(tiny_supernet_dir):
    common = ["generate", "--model", str(tiny_supernet_dir), "--prompt", "hello there", "--max-tokens", "4"]
    fp32 = cli(*common, "--ignore-eos")
    bf16 = cli(*common, "--ignore-eos", "--dtype", "bf16", "--device", "cpu")
    assert fp32.exit_code == 0 and bf16.exit_code == 0, fp32.output + bf16.output
    assert bf16.stdout.strip()  # four tokens of text
    bad = cli(*common, "--dtype", "fp8")
    assert bad.exit_code == 2 and "--dtype 'fp8'" in bad.output
    bad = cli(*common, "--device", "tpu")
    assert bad.exit_code == 2 and "--device 'tpu'" in bad.output


def test_eval_cli_accepts_bf16(tiny_supernet_dir, tmp_path):
    import json

    (tmp_path / "held.txt").write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 80))
    common = ["eval", "--model", str(tiny_supernet_dir), "--data", str(tmp_path / "held.txt"), "--seq-len", "32"]
    common += ["--max-tokens", "128", "--placement", "all-fa", "--placement", "all-gdn"]
    runs = {}
    for dtype in ("float32", "bf16"):
        res = cli(*common, "--dtype", dtype, "--json", str(tmp_path / f"{dtype}.json"))
        assert res.exit_code == 0, res.output
        runs[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())["results"]
    for name in ("teacher", "all-fa", "all-gdn"):  # same perplexities to bf16's precision
        assert runs["bf16"][name]["ppl"] == pytest.approx(runs["float32"][name]["ppl"], rel=0.05)
    bad = cli(*common, "--dtype", "int8")
    assert bad.exit_code == 2 and "--dtype 'int8'" in bad.output


def test_train_cli_maps_dtype_and_refuses_gpu(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("model: {checkpoint: nowhere}\n")
    bad = cli("train", str(config), "--device", "cuda:0")
    assert bad.exit_code == 2 and "--device 'cuda:0'" in bad.output
    bad = cli("train", str(config), "--dtype", "fp16")
    assert bad.exit_code == 2 and "--dtype 'fp16': training takes float32 or bfloat16" in bad.output


def test_train_dtype_becomes_run_autocast(tmp_path):
    from supernet.training.cli import device_overrides
    from supernet.training.config import load_train_config

    assert device_overrides("cpu", "auto") == []
    config = tmp_path / "train.yaml"
    config.write_text("model: {checkpoint: nowhere}\nrun: {autocast: bf16}\n")
    assert load_train_config(config, device_overrides("cpu", "bf16")).run.autocast == "bf16"
    assert load_train_config(config, device_overrides("cpu", "fp32")).run.autocast == "none"
