"""The real server on a free localhost port, driven by the official openai client."""

from __future__ import annotations

import concurrent.futures as cf
import math

import httpx
import pytest

from supernet.generate import greedy_generate

PROMPT = "The quick brown fox"


def offline_greedy(model, tokenizer, prompt_ids, preset, max_tokens):
    return greedy_generate(model, prompt_ids, preset, max_tokens, [tokenizer.eos_token_id])


def token_ids(tokens: list[str]) -> list[int]:
    """Tokens sent with return_tokens_as_token_ids ("token_id:<id>") back to ids."""
    return [int(t.removeprefix("token_id:")) for t in tokens]


IDS = {"return_tokens_as_token_ids": True}


def test_models_lists_every_preset(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny"
    for preset in ("all-fa", "all-swa", "all-gdn", "all-kda", "fa-every-4:gdn"):
        assert f"tiny:{preset}" in ids
    raw = httpx.get(server.url + "/v1/models").json()["data"]
    gdn = next(m for m in raw if m["id"] == "tiny:all-gdn")
    assert gdn["placement"] == "gdn*4" and gdn["max_model_len"] == 256


@pytest.mark.parametrize("preset", ["all-fa", "all-gdn", "all-swa", "all-kda", "fa-every-4:gdn"])
def test_greedy_completion_equals_offline(client, tiny_model, tiny_tokenizer, preset):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    ref = offline_greedy(tiny_model, tiny_tokenizer, ids, preset, 24)
    resp = client.completions.create(
        model=f"tiny:{preset}", prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0, extra_body=IDS
    )
    choice = resp.choices[0]
    assert token_ids(choice.logprobs.tokens) == ref
    assert choice.text == tiny_tokenizer.decode(ref, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == len(ref)
    assert choice.finish_reason == ("stop" if ref[-1] == tiny_tokenizer.eos_token_id else "length")


def test_token_ids_prompt_and_default_preset(client, tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    ref = offline_greedy(tiny_model, tiny_tokenizer, ids, "all-fa", 10)  # all-fa: the built-in default
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert resp.choices[0].text == tiny_tokenizer.decode(ref, skip_special_tokens=True)
    assert resp.model == "tiny"


def test_preset_by_extra_body_and_vllm_xargs(client, tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    ref = tiny_tokenizer.decode(
        offline_greedy(tiny_model, tiny_tokenizer, ids, "all-kda", 12), skip_special_tokens=True
    )
    a = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"preset": "all-kda"}
    )
    b = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"vllm_xargs": {"preset": "all-kda"}},
    )
    assert a.choices[0].text == b.choices[0].text == ref


def test_two_presets_at_once_and_mixed_batch_equals_alone(client, tiny_model, tiny_tokenizer):
    """Three concurrent requests on three presets share decode batches yet give exactly their solo tokens."""
    presets = ["all-fa", "all-gdn", "fa-every-4:kda"]
    prompts = [PROMPT, "Call me Ishmael.", "To be, or not to be"]
    refs = [
        offline_greedy(tiny_model, tiny_tokenizer, tiny_tokenizer(p)["input_ids"], preset, 40)
        for p, preset in zip(prompts, presets, strict=True)
    ]
    assert len({tuple(r) for r in refs}) == 3

    def run(i):
        stream = client.completions.create(
            model=f"tiny:{presets[i]}",
            prompt=prompts[i],
            max_tokens=40,
            temperature=0,
            logprobs=0,
            stream=True,
            extra_body=IDS,
        )
        tokens, text = [], ""
        for chunk in stream:
            c = chunk.choices[0]
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
        return text, tokens

    with cf.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run, range(3)))
    for (text, tokens), ref in zip(results, refs, strict=True):
        assert token_ids(tokens) == ref
        assert text == tiny_tokenizer.decode(ref, skip_special_tokens=True)


def test_streaming_chunks_reassemble_and_report_usage(client, tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    ref = offline_greedy(tiny_model, tiny_tokenizer, ids, "all-swa", 16)
    chunks = list(
        client.completions.create(
            model="tiny:all-swa",
            prompt=PROMPT,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) > 2
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tiny_tokenizer.decode(ref, skip_special_tokens=True)
    assert chunks[-1].usage.completion_tokens == len(ref) and chunks[-1].usage.prompt_tokens == len(ids)


def test_logprobs_and_echo_match_the_model(client, tiny_model, tiny_tokenizer):
    """echo + logprobs (what log-likelihood evaluation sends): prompt logprobs equal the model's own."""
    import torch

    ids = tiny_tokenizer(PROMPT)["input_ids"]
    resp = client.completions.create(
        model="tiny:all-gdn", prompt=PROMPT, max_tokens=0, echo=True, logprobs=3, temperature=0
    )
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text == PROMPT
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids]), "all-gdn").logits[0]
    ref = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    for got, want in zip(lp.token_logprobs[1:], ref.tolist(), strict=True):
        assert math.isclose(got, want, abs_tol=1e-4)
    assert all(len(t) >= 3 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # generated tokens: chosen logprob is the max of the top list under greedy
    resp = client.completions.create(
        model="tiny:all-fa", prompt=PROMPT, max_tokens=5, logprobs=2, temperature=0, extra_body=IDS
    )
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-6) and chosen <= 0


def test_chat_completion_and_stream(client, tiny_model, tiny_tokenizer):
    messages = [{"role": "user", "content": "Hello there"}]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    ref = offline_greedy(tiny_model, tiny_tokenizer, ids, "fa-every-4:gdn", 12)
    resp = client.chat.completions.create(
        model="tiny:fa-every-4:gdn",
        messages=messages,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == tiny_tokenizer.decode(ref, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == len(ref)
    assert len(resp.choices[0].logprobs.content) == len(ref)
    assert all(len(c.top_logprobs) == 2 for c in resp.choices[0].logprobs.content)
    stream = client.chat.completions.create(
        model="tiny:fa-every-4:gdn", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason


def test_sampling_seed_n_and_stop(client, tiny_tokenizer):
    kw = dict(model="tiny:all-gdn", prompt=PROMPT, max_tokens=20, temperature=1.0, top_p=0.9, seed=123)
    a = client.completions.create(**kw, extra_body={"top_k": 50})
    b = client.completions.create(**kw, extra_body={"top_k": 50})
    assert a.choices[0].text == b.choices[0].text  # seeded: reproducible
    many = client.completions.create(
        model="tiny:all-gdn", prompt=PROMPT, max_tokens=20, temperature=1.0, n=3, seed=7
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert len({c.text for c in many.choices}) > 1  # independent samples off one shared prefill
    assert many.usage.completion_tokens == 60 or all(c.finish_reason == "stop" for c in many.choices)
    # stop string: cut before the first occurrence, finish_reason "stop"
    full = client.completions.create(model="tiny:all-fa", prompt=PROMPT, max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(
        model="tiny:all-fa", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_health_and_metrics(client, server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    client.completions.create(model="tiny:all-kda", prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert 'supernet_requests_total{finish_reason="length",preset="all-kda"}' in text
    assert 'supernet_time_to_first_token_seconds_count{preset="all-kda"}' in text
    assert 'supernet_inter_token_latency_seconds_count{preset="all-kda"}' in text
    assert "supernet_requests_waiting" in text and "supernet_cache_budget_bytes" in text


def test_list_of_prompts_with_n(client, tiny_model, tiny_tokenizer):
    prompts = [PROMPT, "Call me Ishmael."]
    resp = client.completions.create(model="tiny:all-gdn", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in sorted(resp.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    for c in resp.choices:
        ids = tiny_tokenizer(prompts[c.index // 2])["input_ids"]
        ref = offline_greedy(tiny_model, tiny_tokenizer, ids, "all-gdn", 6)
        assert c.text == tiny_tokenizer.decode(ref, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == sum(len(tiny_tokenizer(p)["input_ids"]) for p in prompts)


def test_streamed_echo_starts_with_the_prompt(client, tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    ref = offline_greedy(tiny_model, tiny_tokenizer, ids, "all-fa", 8)
    for logprobs in (None, 1):
        chunks = list(
            client.completions.create(
                model="tiny",
                prompt=PROMPT,
                max_tokens=8,
                temperature=0,
                echo=True,
                stream=True,
                logprobs=logprobs,
            )
        )
        assert chunks[0].choices[0].text == PROMPT
        assert "".join(c.choices[0].text for c in chunks) == PROMPT + tiny_tokenizer.decode(ref)
        if logprobs:
            assert len(chunks[0].choices[0].logprobs.tokens) == len(ids)
