"""The real SmolLM2 supernet behind the real server (marked smollm2: skipped without the teacher wheel)."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
from openai import OpenAI

from supernet.generate import greedy_generate
from tests.serving.conftest import start_server

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smol():
    from supernet.convert import build_from_teacher
    from supernet.teacher import load_teacher

    teacher, tokenizer = load_teacher("smollm2")
    model = build_from_teacher(teacher, base_model="smollm2")
    del teacher
    return model, tokenizer


def test_chat_on_two_presets_at_once_equals_offline_greedy(smol):
    model, tokenizer = smol
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    presets = ["all-fa", "fa-every-4:gdn"]
    refs = {p: greedy_generate(model, ids, p, 12, [tokenizer.eos_token_id]) for p in presets}
    server = start_server(model, tokenizer, None, served_model_name="smol")
    srv = next(server)
    client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)

    def ask(preset):
        return client.chat.completions.create(
            model=f"smol:{preset}", messages=messages, max_tokens=12, temperature=0
        )

    try:
        with cf.ThreadPoolExecutor(2) as pool:
            answers = dict(zip(presets, pool.map(ask, presets), strict=True))
    finally:
        server.close()  # stops the server (ServerThread.__exit__)
    for preset in presets:
        got = answers[preset].choices[0].message.content
        assert got == tokenizer.decode(refs[preset], skip_special_tokens=True)
        assert answers[preset].usage.prompt_tokens == len(ids)
    assert "Paris" in answers["all-fa"].choices[0].message.content  # the teacher's own answer (FA is exact)
