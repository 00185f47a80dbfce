"""``supernet serve --dtype bf16``: a bf16 model behind a real server answers every preset with the same greedy
tokens as the same bf16 model offline; bad ``--device``/``--dtype`` values are CLI errors naming them."""

from __future__ import annotations

import pytest
import torch
from openai import OpenAI
from typer.testing import CliRunner

from supernet.generate import greedy_generate
from tests.serving.conftest import start_server

PROMPT = "It is a truth universally acknowledged"
PRESETS = ["all-fa", "all-swa", "all-gdn", "all-kda", "fa-every-4:gdn"]


@pytest.fixture(scope="module")
def bf16_server(tiny_dir):
    from serving.server import load_model

    model, tokenizer = load_model(tiny_dir, device="cpu", dtype="bf16")
    assert model.embed_tokens.weight.dtype is torch.bfloat16
    for srv in start_server(model, tokenizer, tiny_dir, served_model_name="tiny"):
        yield srv, model, tokenizer


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_server_matches_offline_bf16(bf16_server, preset):
    srv, model, tokenizer = bf16_server
    client = OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.completions.create(
        model=f"tiny:{preset}", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    ids = tokenizer(PROMPT)["input_ids"]
    offline = greedy_generate(model, ids, srv.app.state.engine.info.presets.get(preset).placement, 8)
    assert out.choices[0].text == tokenizer.decode(offline)
    assert out.usage.completion_tokens == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "fp8"], "--dtype 'fp8': expected auto"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--device", "cuda:7"], "--device 'cuda:7'"),
    ],
)
def test_serve_cli_rejects_bad_device_or_dtype(tiny_dir, args, message):
    from supernet.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
