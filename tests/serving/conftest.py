"""Shared fixtures for the serving tests: a tiny random supernet checkpoint on disk with a real tokenizer, and
a real uvicorn server on a free localhost port driven by the official openai client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port, tiny_llama_config
from tests.threads import torch_threads

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Serving many presets in one batch: full attention, sliding windows, and delta rules.",
]


def build_tiny_tokenizer(directory: Path):
    """A character-level BPE over printable ASCII (~300 tokens) with ChatML specials and a chat template,
    saved like any HF tokenizer. Every token decodes to printable text, so a random model's output is readable
    and stop strings can be picked from it."""
    import string

    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.decoder = decoders.Fuse()
    alphabet = list(string.printable[:95]) + ["\n"]  # letters, digits, punctuation, space, newline
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Random tiny Llama -> supernet (window 8, 2 sinks); mixers perturbed so presets decode differently."""
    from transformers import LlamaForCausalLM

    from supernet.checkpoint import save_supernet
    from supernet.convert import build_from_teacher

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    cfg = tiny_llama_config(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    teacher = LlamaForCausalLM(cfg).eval()
    model = build_from_teacher(teacher, window=8, sinks=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mixers." in name:
                p.add_(torch.randn_like(p) * 0.05)
    save_supernet(model, directory)
    return directory


def wait_until_healthy(proc, url: str, seconds: float = 90.0) -> None:
    """Poll ``url``/health until the server process answers 200; fail with its output if it exits or times out."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.stdout.read() if proc.stdout is not None else ""
            pytest.fail(f"server did not start:\n{out}")
        time.sleep(0.1)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The server's default on 2 cores (serving.server.default_threads); restored afterwards."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-supernet")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from supernet.checkpoint import load_supernet

    return load_supernet(tiny_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


class ServerThread:
    """A real uvicorn server on a free localhost port, in a thread of the test process (shares the model)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def engine(self):
        return self.app.state.engine.engine  # the LLMEngine behind the AsyncEngine

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(model, tokenizer, model_dir, **settings) -> Iterator[ServerThread]:
    from serving.server import build_app

    app = build_app(model, tokenizer, model_dir=model_dir, **settings)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(tiny_model, tiny_tokenizer, tiny_dir) -> Iterator[ServerThread]:
    yield from start_server(tiny_model, tiny_tokenizer, tiny_dir, served_model_name="tiny")


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
