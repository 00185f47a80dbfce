"""A thin export (only two presets' mixers) served by ``supernet serve --backend vllm``: our HTTP layer over
vLLM's AsyncLLM, with presets picked by model id, matching the full supernet in the embedded engine."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.vllm.conftest import EXPORTED, PROMPT_IDS, free_port, start_server, stop_server

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def serve_backend_vllm(thin_dir, tmp_path_factory):
    port = free_port()
    cmd = [
        sys.executable, "-m", "supernet.cli", "serve", "--backend", "vllm", "--model", str(thin_dir),
        "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
        "--prefill-chunk", "32", "--cache-budget-gib", "1", "--log-level", "warning",
    ]  # fmt: skip
    proc = start_server(cmd, port, tmp_path_factory.mktemp("serve_vllm") / "serve.log")
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
    stop_server(proc)


def tokens(client, model: str, prompt: list[int], max_tokens: int = 12) -> list[int]:
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


def test_models_lists_exactly_the_exported_presets(serve_backend_vllm):
    ids = {m.id for m in serve_backend_vllm.models.list().data}
    assert ids == {"tiny-thin", *(f"tiny-thin:{p}" for p in EXPORTED)}


def test_thin_export_on_vllm_matches_the_full_supernet(serve_backend_vllm, embedded_greedy):
    for preset in EXPORTED:
        assert tokens(serve_backend_vllm, f"tiny-thin:{preset}", PROMPT_IDS) == embedded_greedy(preset)
    assert tokens(serve_backend_vllm, "tiny-thin", PROMPT_IDS) == embedded_greedy(EXPORTED[0])  # the default


def test_concurrent_presets_through_our_http_layer(serve_backend_vllm, embedded_greedy):
    jobs = [(f"tiny-thin:{p}", prompt) for p in EXPORTED for prompt in (PROMPT_IDS, PROMPT_IDS[::-1])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: tokens(serve_backend_vllm, *job, 16), jobs))
    assert got == [embedded_greedy(model.split(":", 1)[1], prompt, 16) for model, prompt in jobs]


def test_a_preset_outside_the_export_is_rejected(serve_backend_vllm):
    with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as err:
        tokens(serve_backend_vllm, "tiny-thin:all-fa", PROMPT_IDS[:4])
    assert "all-gdn" in str(err.value)
