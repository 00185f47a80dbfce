"""`supernet build` + `supernet generate` end to end, against transformers' own greedy generate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "It is a truth universally acknowledged, that"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "supernet.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def teacher_greedy(teacher_dir: Path | str, prompt: str, n: int, model=None, tokenizer=None) -> str:
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(teacher_dir)
    model = model or AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_all_fa_prints_teacher_continuation(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "sn"
    built = run_cli("build", "--teacher", str(tiny_teacher_dir), "--out", str(out_dir), "--window", "8")
    assert built.returncode == 0, built.stderr
    assert (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file()
    gen = run_cli(
        "generate",
        "--model",
        str(out_dir),
        "--placement",
        "all-fa",
        "--prompt",
        PROMPT,
        "--max-tokens",
        "32",
        "--ignore-eos",
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout[:-1] == teacher_greedy(tiny_teacher_dir, PROMPT, 32)


def test_generate_rejects_bad_placement(tiny_supernet_dir: Path) -> None:
    res = run_cli("generate", "--model", str(tiny_supernet_dir), "--placement", "all-mamba", "--prompt", "hi")
    assert res.returncode == 2
    assert "unknown mixer 'mamba'" in res.stderr and "fa, swa, gdn, kda" in res.stderr


def test_build_rejects_missing_teacher(tmp_path: Path) -> None:
    res = run_cli("build", "--teacher", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "nope.gguf" in res.stderr


@pytest.mark.smollm2
def test_smollm2_generate_matches_transformers(tmp_path: Path) -> None:
    from supernet.teacher import load_teacher

    out_dir = tmp_path / "sn"
    assert run_cli("build", "--out", str(out_dir)).returncode == 0
    prompt = "The capital of France is"
    gen = run_cli(
        "generate", "--model", str(out_dir), "--prompt", prompt, "--max-tokens", "32", "--ignore-eos"
    )
    assert gen.returncode == 0, gen.stderr
    teacher, tokenizer = load_teacher("smollm2")
    assert gen.stdout[:-1] == teacher_greedy(None, prompt, 32, teacher, tokenizer)
