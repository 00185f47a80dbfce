"""The plugin inside vLLM's own OpenAI server, driven by the official ``openai`` client.

One engine serves five presets (one per mixer, and a hybrid using all four); every output is compared token for
token with the embedded engine's greedy output (fp32), alone and with three presets decoding in one batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.vllm.conftest import PRESETS, PROMPT_IDS

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")


def complete(client, preset: str | None, prompt: list[int], max_tokens: int = 12) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True}
    if preset is not None:
        extra["vllm_xargs"] = {"preset": preset}
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)
    return list(out.choices[0].model_extra["token_ids"])


@pytest.fixture(scope="module")
def client(vllm_openai_server):
    return openai.OpenAI(base_url=vllm_openai_server, api_key="unused", timeout=300)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_greedy_equals_embedded_engine(client, embedded_greedy, preset):
    assert complete(client, preset, PROMPT_IDS) == embedded_greedy(PRESETS[preset])


def test_presets_really_differ(embedded_greedy):
    """Guards the test above: with perturbed mixers every preset produces its own continuation."""
    outputs = {tuple(embedded_greedy(spec)) for spec in PRESETS.values()}
    assert len(outputs) == len(PRESETS)


def test_no_preset_uses_the_engine_default(client, embedded_greedy):
    assert complete(client, None, PROMPT_IDS) == embedded_greedy("all-fa")


def test_three_presets_in_one_batch_equal_their_solo_outputs(client, embedded_greedy):
    """Three requests with different prompts and presets decode concurrently in one engine (mixed prefill and
    decode rows, 32-token prefill chunks); each equals what it produces alone."""
    jobs = [
        ("all-gdn", PROMPT_IDS),
        ("hybrid", PROMPT_IDS[::-1]),
        ("all-swa", PROMPT_IDS[5:35]),
    ]
    solo = [complete(client, preset, prompt, 24) for preset, prompt in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: complete(client, job[0], job[1], 24), jobs))
    assert together == solo
    for (preset, prompt), tokens in zip(jobs, solo, strict=True):
        assert tokens == embedded_greedy(PRESETS[preset], prompt, 24)


def test_chat_completion_with_vllm_xargs(client, embedded_greedy):
    messages = [{"role": "user", "content": "a single man in possession"}]
    chat = {
        preset: client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=8,
            temperature=0,
            extra_body={"vllm_xargs": {"preset": preset}, "ignore_eos": True, "return_token_ids": True},
        )
        for preset in ("all-fa", "all-kda")
    }
    prompt = chat["all-kda"].model_extra["prompt_token_ids"]
    assert chat["all-kda"].choices[0].model_extra["token_ids"] == embedded_greedy("all-kda", prompt, 8)
    assert chat["all-fa"].choices[0].model_extra["token_ids"] == embedded_greedy("all-fa", prompt, 8)


def test_unknown_preset_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, "no-such-preset", PROMPT_IDS[:5])
    assert "no-such-preset" in str(err.value) and "all-gdn" in str(err.value)


def test_engine_wide_switch_changes_the_default_only(vllm_openai_server, client, embedded_greedy):
    """collective_rpc("set_default_preset") (the plugin's worker extension) switches what requests without a
    preset run; requests naming a preset are unaffected and nothing needs a restart or a cache wipe."""
    import httpx

    root = vllm_openai_server.removesuffix("/v1")

    def switch(name: str) -> list:
        r = httpx.post(f"{root}/collective_rpc", json={"method": "set_default_preset", "args": [name]}, timeout=60)
        r.raise_for_status()
        return r.json()["results"]

    assert switch("all-kda") == ["all-fa"]  # returns the previous default
    try:
        assert complete(client, None, PROMPT_IDS) == embedded_greedy("all-kda")
        assert complete(client, "all-gdn", PROMPT_IDS) == embedded_greedy("all-gdn")
    finally:
        switch("all-fa")
    assert complete(client, None, PROMPT_IDS) == embedded_greedy("all-fa")
