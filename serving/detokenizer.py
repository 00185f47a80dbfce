"""Incremental detokenization and stop strings.

Decoding the whole output after every token is quadratic; decoding only the new token is wrong for byte-level
and SentencePiece tokenizers (a character can span tokens; a leading space depends on the previous token).
``tokenizers.decoders.DecodeStream`` does this right in Rust: it decodes a short window ending at the new token,
emits what the window adds, and returns nothing while the tail is an incomplete UTF-8 sequence -- the scheme
vLLM and TGI use. It starts from the prompt's last tokens, so the first output token gets its leading space
right. What this class adds is stop strings: text that could still turn into a stop string is held back.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

CONTEXT_TOKENS = 5  # prompt tokens the stream starts from


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"{type(tokenizer).__name__}: streaming needs a fast (tokenizers-backed) tokenizer")
        self.tokenizer, self.backend = tokenizer, backend
        self.stream = DecodeStream(ids=list(prompt_ids[-CONTEXT_TOKENS:]), skip_special_tokens=True)
        self.pending: list[int] = []  # tokens the stream holds back (an incomplete character so far)
        self.text = ""  # the output text so far (stop string excluded once one matched)
        self.emitted = 0  # characters of self.text already handed to the client
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming in these
        self.stopped = False

    def add(self, token_id: int, *, skip_text: bool = False) -> bool:
        """Append a token; return True when a stop string matched (self.text is then cut before it).
        ``skip_text``: a stop token, counted by the caller but never shown."""
        if skip_text:
            return False
        chunk = self.stream.step(self.backend, token_id)
        if chunk is None:
            self.pending.append(token_id)
            return False
        self.pending.clear()
        start = max(0, len(self.text) - self.hold)
        self.text += chunk
        hits = [at for s in self.stop if (at := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return True
        return False

    def flush(self) -> None:
        """At the end: tokens still held back (an incomplete character) go out as the tokenizer decodes them."""
        if self.stopped or not self.pending:
            return
        self.text += self.tokenizer.decode(self.pending, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        self.pending.clear()

    def take(self, final: bool) -> str:
        """Text safe to send now: all of it at the end, else all but what a stop string could still claim."""
        if final:
            self.flush()
        end = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
