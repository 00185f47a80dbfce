"""Fixtures: a tiny random Llama teacher converted to a supernet checkpoint on disk, with a small real
tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama_config
from tests.threads import torch_threads

TINY_VOCAB = 320


def _train_tokenizer(path: Path):
    """A byte-level BPE tokenizer trained on a few KB of the demo corpus (real tokenizer, tiny vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from supernet.training.data import read_documents

    text = [d.text for d in read_documents(["demo:shakespeare"])[:3]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB - 2,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_tiny_checkpoint(path: Path, seed: int = 0, layers: int = 4) -> Path:
    from transformers import LlamaForCausalLM

    from supernet.checkpoint import save_supernet
    from supernet.convert import build_from_teacher

    torch.manual_seed(seed)
    cfg = tiny_llama_config(
        vocab_size=TINY_VOCAB,
        num_hidden_layers=layers,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=1,
    )
    teacher = LlamaForCausalLM(cfg).eval()
    model = build_from_teacher(teacher, window=32, sinks=2)
    # Perturb the non-FA mixers so placements differ in quality (transfer init alone is close to the teacher).
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mixers." in name and "lora" in name and name.endswith(".B"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    save_supernet(model, path, delta=False)
    _train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_sn") / "ckpt")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine run fastest on one thread (no OpenMP barrier spinning when other
    jobs hold the cores); restored afterwards for other packages' tests."""
    with torch_threads(1):
        yield
