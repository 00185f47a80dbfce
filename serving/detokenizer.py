"""Incremental detokenization and stop strings.

Decoding the whole output after every token is quadratic; decoding only the new token is wrong for byte-level
and SentencePiece tokenizers (a character can span tokens; a leading space depends on the previous token). We
decode a short window that ends at the new tokens and emit what it adds beyond the window's already-seen
prefix, holding back while the tail is an incomplete UTF-8 sequence (U+FFFD) -- the scheme vLLM and TGI use.
"""

from __future__ import annotations

from typing import Any

CONTEXT_TOKENS = 5  # prompt tokens kept in the window so the first output token gets its leading space right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # the output text so far (stop string excluded once one matched)
        self.emitted = 0  # characters of self.text already handed to the client
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming in these
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int, *, skip_text: bool = False) -> bool:
        """Append a token; return True when a stop string matched (self.text is then cut before it)."""
        self.ids.append(token_id)
        if skip_text:  # a stop token: counted, never shown
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return False
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        start = max(0, len(self.text) - self.hold)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        hits = [at for s in self.stop if (at := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return True
        return False

    def flush(self) -> None:
        """At the end: whatever tokens are still held back (an incomplete character) go out as decoded."""
        if self.stopped or self.read_offset >= len(self.ids):
            return
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)

    def take(self, final: bool) -> str:
        """Text safe to send now: all of it at the end, else all but what a stop string could still claim."""
        if final:
            self.flush()
        end = len(self.text) if final or not self.stop else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
