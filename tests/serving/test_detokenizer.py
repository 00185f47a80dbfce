"""Incremental detokenization (tokenizers' DecodeStream) with stop-string hold-back, on a real byte-level BPE
tokenizer where characters span several tokens."""

from __future__ import annotations

import pytest

from serving.detokenizer import IncrementalDetokenizer
from tests.conftest import make_tiny_tokenizer

TEXT = "the quick brown fox: café, naïve, 東京 and 🦊 jumps"


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer(vocab_size=300)


def stream(tok, ids, prompt=(), stop=()):
    detok = IncrementalDetokenizer(tok, list(prompt), list(stop))
    pieces = []
    for t in ids:
        stopped = detok.add(t)
        pieces.append(detok.take(stopped))
        if stopped:
            break
    else:
        pieces.append(detok.take(True))
    return pieces, detok


def test_pieces_add_up_to_the_full_decode_and_never_split_a_character(tok):
    ids = tok(TEXT)["input_ids"]
    assert len(ids) > len(TEXT.split())  # multi-byte characters really span tokens here
    pieces, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_the_first_token_keeps_its_leading_space_after_the_prompt(tok):
    prompt, out = tok("the quick")["input_ids"], tok(" brown fox")["input_ids"]
    pieces, _ = stream(tok, out, prompt=prompt)
    assert "".join(pieces) == " brown fox"


def test_stop_string_across_tokens_is_held_back_and_cut(tok):
    ids = tok(TEXT)["input_ids"]
    pieces, detok = stream(tok, ids, stop=["fé, na"])
    assert detok.stopped and "".join(pieces) == detok.text == "the quick brown fox: ca"
    assert not any("fé" in p for p in pieces)  # a prefix of the stop string was never sent early


def test_an_incomplete_character_at_the_end_is_flushed(tok):
    ids = tok("🦊")["input_ids"]
    assert len(ids) > 1
    pieces, _ = stream(tok, ids[:-1])  # generation ended mid-character (max_tokens)
    assert "".join(pieces) == tok.decode(ids[:-1])


def test_stop_tokens_are_never_shown(tok):
    ids = tok("fox")["input_ids"]
    detok = IncrementalDetokenizer(tok, [], [])
    for t in ids:
        detok.add(t)
    detok.add(tok.eos_token_id, skip_text=True)
    assert detok.take(True) == "fox"
