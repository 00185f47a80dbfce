"""Between the endpoints and the engine: submitting a request's prompts, running a non-streaming request to
the end, interleaving several streams, and server-sent-event framing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from serving.api.errors import APIError, error_body
from serving.api.params import Resolved
from serving.auto_preset import AutoPreset
from serving.protocol import SpeculativeUsage
from serving.sampling import SamplingParams, TokenLogprobs
from serving.types import EngineClient, GenerationRequest, OutputStream, RequestOutput, SpecUsage

PromptLogprobs = list[TokenLogprobs | None] | None


@dataclass
class Choice:
    """Accumulates one choice of a non-streaming response."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


def submit(
    engine: EngineClient,
    rid: str,
    prompts: list[list[int]],
    resolved: Resolved,
    params: SamplingParams,
    speculative: bool | None = None,
    auto: AutoPreset | None = None,
) -> list[OutputStream]:
    """One engine request per prompt (``<rid>-<i>``); if any is refused, the ones admitted are aborted. With
    the auto preset enabled, every stream counts in its load until it ends."""
    streams: list[OutputStream] = []
    try:
        for i, ids in enumerate(prompts):
            req = GenerationRequest(
                f"{rid}-{i}", ids, resolved.placement, params, preset=resolved.preset, speculative=speculative
            )
            stream = engine.submit(req)
            streams.append(stream if auto is None else auto.track(stream, resolved.preset, params.n))
    except Exception:
        for s in streams:
            s.abort()
        raise
    return streams


class SpecTally:
    """Self-speculative decoding counters over a response's engine requests (the usage's ``speculative`` key)."""

    def __init__(self) -> None:
        self.latest: dict[str, SpecUsage] = {}  # request id -> its counters so far (outputs carry totals)

    def see(self, out: RequestOutput) -> None:
        if out.speculative is not None:
            self.latest[out.request_id] = out.speculative

    def usage(self) -> SpeculativeUsage | None:
        if not self.latest:
            return None
        total = SpecUsage()
        for u in self.latest.values():
            total.add(u)
        return SpeculativeUsage(
            draft=total.draft,
            draft_tokens=total.draft_tokens,
            accepted_tokens=total.accepted_tokens,
            verify_steps=total.verify_steps,
            acceptance_rate=round(total.acceptance_rate, 4),
            tokens_per_verify_step=round(total.tokens_per_verify_step, 4),
        )


async def collect(
    request: Request, streams: list[OutputStream], spec: SpecTally | None = None
) -> list[tuple[PromptLogprobs, list[Choice]]]:
    """Run a non-streaming request to the end; a client that hangs up aborts it."""

    async def one(stream: OutputStream) -> tuple[PromptLogprobs, list[Choice]]:
        choices: dict[int, Choice] = {}
        prompt_lps = None
        async for out in stream:
            if out.error:
                raise APIError(500, out.error)
            if spec is not None:
                spec.see(out)
            if out.prompt_logprobs is not None:
                prompt_lps = out.prompt_logprobs
            for d in out.deltas:
                ch = choices.setdefault(d.index, Choice())
                ch.text += d.text
                ch.token_ids += d.token_ids
                ch.logprobs += d.logprobs
                ch.finish_reason = d.finish_reason or ch.finish_reason
        return prompt_lps, [choices[i] for i in sorted(choices)]

    work = asyncio.ensure_future(asyncio.gather(*(one(s) for s in streams)))
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.5)
            if done:
                return work.result()
            if await request.is_disconnected():
                work.cancel()
                raise APIError(499, "client disconnected")
    finally:
        if not work.done():
            work.cancel()
        for s in streams:
            s.abort()


async def merge(streams: list[OutputStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as their outputs arrive, tagged with the stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    iters = [aiter(s) for s in streams]
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iters)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                pending[asyncio.ensure_future(anext(iters[i]))] = i
    finally:
        for task in pending:
            task.cancel()


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(message: str) -> str:
    """A failure after the stream has started: the status line is already sent, so the error is an event."""
    return sse(error_body(500, message))


SSE_DONE = "data: [DONE]\n\n"
