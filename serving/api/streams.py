"""Between the endpoints and the engine: submitting a request's prompts, counting its usage, running a
non-streaming request to the end, interleaving several streams, and server-sent-event framing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse

from serving.api.deps import get_engine, get_settings
from serving.api.errors import APIError, error_body
from serving.api.params import OpenAIRequest, Resolved, speculative_flag
from serving.protocol import PromptTokensDetails, SpeculativeUsage, Usage
from serving.sampling import SamplingParams, TokenLogprobs
from serving.types import GenerationRequest, OutputStream, RequestOutput, SequenceDelta, SpecUsage

PromptLogprobs = list[TokenLogprobs | None] | None


@dataclass
class Choice:
    """Accumulates one choice of a non-streaming response."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


class UsageTally:
    """A response's usage over its engine requests: prompt and generated tokens, and the self-speculative
    decoding counters (the usage's ``speculative`` key). Every output of the response passes ``see``."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.latest: dict[str, SpecUsage] = {}  # request id -> its counters so far (outputs carry totals)
        self.cached: dict[str, int] = {}  # request id -> prompt tokens it took from the prefix cache

    def see(self, out: RequestOutput) -> None:
        self.completion_tokens += sum(len(d.token_ids) for d in out.deltas)
        self.cached[out.request_id] = out.cached_tokens
        if out.speculative is not None:
            self.latest[out.request_id] = out.speculative

    def speculative(self) -> SpeculativeUsage | None:
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

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached.values())),
            speculative=self.speculative(),
        )


@dataclass
class Submission:
    """One OpenAI request in the engine: what its response (or every chunk of it) says, and its streams."""

    id: str
    created: int
    model: str  # the model id the response names (Resolved.model_id)
    streams: list[OutputStream]
    tally: UsageTally

    def abort(self) -> None:
        """Free everything in the engine (done, failed, or the client gone); harmless when already ended."""
        for s in self.streams:
            s.abort()


def submit(
    request: Request,
    body: OpenAIRequest,
    kind: str,
    prompts: list[list[int]],
    resolved: Resolved,
    params: SamplingParams,
) -> Submission:
    """One engine request per prompt (``<id>-<i>``) under a fresh response id ``<kind>-<hex>`` (OpenAI's
    ``cmpl`` / ``chatcmpl``); if any is refused, the ones admitted are aborted. With the auto preset enabled,
    every stream counts in its load until it ends."""
    engine, auto = get_engine(request), get_settings(request).auto
    speculative = speculative_flag(body)
    rid = f"{kind}-{uuid.uuid4().hex}"
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
    tally = UsageTally(sum(len(p) for p in prompts))
    return Submission(rid, int(time.time()), resolved.model_id, streams, tally)


async def collect(request: Request, sub: Submission) -> list[tuple[PromptLogprobs, list[Choice]]]:
    """Run a non-streaming request to the end; a client that hangs up aborts it."""

    async def one(stream: OutputStream) -> tuple[PromptLogprobs, list[Choice]]:
        choices: dict[int, Choice] = {}
        prompt_lps = None
        async for out in stream:
            if out.error:
                raise APIError(500, out.error)
            sub.tally.see(out)
            if out.prompt_logprobs is not None:
                prompt_lps = out.prompt_logprobs
            for d in out.deltas:
                ch = choices.setdefault(d.index, Choice())
                ch.text += d.text
                ch.token_ids += d.token_ids
                ch.logprobs += d.logprobs
                ch.finish_reason = d.finish_reason or ch.finish_reason
        return prompt_lps, [choices[i] for i in sorted(choices)]

    streams = sub.streams
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
        sub.abort()


async def outputs(sub: Submission) -> AsyncIterator[tuple[int, RequestOutput]]:
    """A streaming request's outputs as they arrive (tagged with the prompt's position), each counted in its
    usage first."""
    async for i, out in merge(sub.streams):
        sub.tally.see(out)
        yield i, out


def changed(out: RequestOutput) -> list[SequenceDelta]:
    """The deltas worth a chunk: those with text, tokens or a finish reason."""
    return [d for d in out.deltas if d.text or d.token_ids or d.finish_reason]


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


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream")


def include_usage(body: OpenAIRequest) -> bool:
    """``stream_options.include_usage``: a last chunk with the usage and no choices, as OpenAI sends it."""
    return bool(body.stream_options and body.stream_options.include_usage)


SSE_DONE = "data: [DONE]\n\n"
