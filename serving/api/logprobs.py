"""Log-probability blocks in the completions (legacy) and chat shapes."""

from __future__ import annotations

from typing import Any

from serving.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from serving.sampling import TokenLogprobs


class LogprobFormatter:
    """Token strings (or vLLM's ``token_id:<id>`` when asked) and logprob entries for one request."""

    def __init__(self, tokenizer: Any, ids_as_text: bool = False) -> None:
        self.tokenizer, self.ids_as_text = tokenizer, ids_as_text

    def token_str(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.ids_as_text else self.tokenizer.decode([token_id])

    def completion(
        self,
        prompt: list[int],
        prompt_lps: list[TokenLogprobs | None] | None,
        token_ids: list[int],
        lps: list[TokenLogprobs],
        k: int,
        offset: int = 0,
    ) -> CompletionLogprobs:
        """Echoed prompt entries (when given), then generated ones; text_offset counts characters."""
        out = CompletionLogprobs()
        entries: list[tuple[int, TokenLogprobs | None]] = []
        if prompt_lps is not None:
            entries += zip(prompt, prompt_lps, strict=True)
        entries += zip(token_ids, lps, strict=True)
        pos = offset
        for tok, entry in entries:
            text = self.token_str(tok)
            out.tokens.append(text)
            out.text_offset.append(pos)
            pos += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(entry.logprob)
            top = {self.token_str(i): lp for i, lp in zip(entry.top_ids[:k], entry.top_logprobs[:k], strict=True)}
            top.setdefault(self.token_str(entry.token_id), entry.logprob)
            out.top_logprobs.append(top)
        return out

    def chat(self, lps: list[TokenLogprobs]) -> ChatLogprobs:
        content = []
        for e in lps:
            s = self.token_str(e.token_id)
            tops = [(self.token_str(i), lp) for i, lp in zip(e.top_ids, e.top_logprobs, strict=True)]
            content.append(
                ChatTokenLogprob(
                    token=s,
                    logprob=e.logprob,
                    bytes=list(s.encode()),
                    top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in tops],
                )
            )
        return ChatLogprobs(content=content)
