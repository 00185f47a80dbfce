"""POST /v1/completions: text or token-id prompts (several per request), ``n`` samples each, ``echo`` and
prompt log-probabilities (what log-likelihood evaluation harnesses send), streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.api.deps import check_api_key, get_settings, open_request
from serving.api.errors import APIError
from serving.api.logprobs import LogprobFormatter
from serving.api.params import completion_prompts, sampling_params, speculative_flag
from serving.api.streams import SSE_DONE, SpecTally, collect, merge, sse, sse_error, submit
from serving.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from serving.types import OutputStream

router = APIRouter(dependencies=[Depends(check_api_key)])


def completion_max_tokens(body: CompletionRequest) -> int:
    """OpenAI's default of 16; 0 only with echo (score the prompt, generate nothing)."""
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens < 0 or (max_tokens == 0 and not body.echo):
        raise APIError(
            400,
            f"max_tokens must be at least 1, got {max_tokens} (0 is allowed only with echo=true, to score the prompt)",
            param="max_tokens",
        )
    return max_tokens


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    engine, resolved, fmt = open_request(body, request)
    tokenizer = engine.tokenizer
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of must equal n (server-side candidate selection is not supported)", param="best_of")
    max_tokens = completion_max_tokens(body)
    prompts = completion_prompts(body.prompt, tokenizer)
    params = sampling_params(
        body,
        max_tokens,
        len(tokenizer),
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if body.echo else None,  # prompt scoring only when asked
    )
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = submit(engine, rid, prompts, resolved, params, speculative_flag(body), get_settings(request).auto)
    created = int(time.time())
    if body.stream:
        gen = stream_completion(rid, created, resolved.model_id, prompts, body, streams, fmt)
        return StreamingResponse(gen, media_type="text/event-stream")
    tally = SpecTally()
    results = await collect(request, streams, tally)
    choices, usage = [], Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    for i, (prompt, (prompt_lps, seqs)) in enumerate(zip(prompts, results, strict=True)):
        usage.prompt_tokens += len(prompt)
        prefix_text = tokenizer.decode(prompt) if body.echo else ""
        for seq_index, ch in enumerate(seqs):
            usage.completion_tokens += len(ch.token_ids)
            lp = None
            if body.logprobs is not None:
                lp = fmt.completion(
                    prompt if body.echo else [],
                    prompt_lps if body.echo else None,
                    ch.token_ids,
                    ch.logprobs,
                    body.logprobs,
                )
            choices.append(
                CompletionChoice(
                    index=i * body.n + seq_index,
                    text=prefix_text + ch.text,
                    logprobs=lp,
                    finish_reason=ch.finish_reason,
                )
            )
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    usage.speculative = tally.usage()
    return JSONResponse(
        CompletionResponse(id=rid, created=created, model=resolved.model_id, choices=choices, usage=usage).model_dump()
    )


async def stream_completion(
    rid: str,
    created: int,
    model_id: str,
    prompts: list[list[int]],
    body: CompletionRequest,
    streams: list[OutputStream],
    fmt: LogprobFormatter,
) -> AsyncIterator[str]:
    n = body.n
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = 0
    offsets: dict[int, int] = {}
    echoed: set[int] = set()
    tally = SpecTally()

    def chunk(choices: list[CompletionChoice]) -> str:
        return sse(
            CompletionResponse(id=rid, created=created, model=model_id, choices=choices).model_dump(exclude={"usage"})
        )

    try:
        async for i, out in merge(streams):
            if out.error:
                yield sse_error(out.error)
                return
            tally.see(out)
            choices = []
            if body.echo and i not in echoed:  # the prompt once per choice, before its first tokens
                echoed.add(i)
                text = fmt.tokenizer.decode(prompts[i])
                for j in range(n):
                    lp = None
                    if body.logprobs is not None and out.prompt_logprobs is not None:
                        lp = fmt.completion(prompts[i], out.prompt_logprobs, [], [], body.logprobs)
                    offsets[i * n + j] = len(text)
                    choices.append(CompletionChoice(index=i * n + j, text=text, logprobs=lp))
                # a chunk of its own: one choice index per chunk, as clients reassemble them
                yield chunk(choices)
                choices = []
            for d in out.deltas:
                completion_tokens += len(d.token_ids)
                if not (d.text or d.token_ids or d.finish_reason):
                    continue
                index = i * n + d.index
                lp = None
                if body.logprobs is not None:
                    lp = fmt.completion([], None, d.token_ids, d.logprobs, body.logprobs, offset=offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp.tokens)
                choices.append(CompletionChoice(index=index, text=d.text, logprobs=lp, finish_reason=d.finish_reason))
            if choices:
                yield chunk(choices)
        if body.stream_options and body.stream_options.include_usage:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
                speculative=tally.usage(),
            )
            yield sse(CompletionResponse(id=rid, created=created, model=model_id, choices=[], usage=usage).model_dump())
        yield SSE_DONE
    finally:  # client gone (generator cancelled) or done: make sure the engine frees everything
        for s in streams:
            s.abort()
