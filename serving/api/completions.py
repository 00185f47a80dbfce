"""POST /v1/completions: text or token-id prompts (several per request), ``n`` samples each, ``echo`` and
prompt log-probabilities (what log-likelihood evaluation harnesses send), streamed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from serving.api import streams
from serving.api.deps import check_api_key, open_request
from serving.api.errors import APIError
from serving.api.logprobs import LogprobFormatter
from serving.api.params import completion_prompts, sampling_params
from serving.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage

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
    scored = body.logprobs if body.echo else None  # prompt scoring only when asked
    params = sampling_params(body, max_tokens, len(tokenizer), logprobs=body.logprobs, prompt_logprobs=scored)
    sub = streams.submit(request, body, "cmpl", prompts, resolved, params)
    if body.stream:
        return streams.sse_response(stream_completion(sub, prompts, body, fmt))
    results = await streams.collect(request, sub)
    choices: list[CompletionChoice] = []
    for i, (prompt, (prompt_lps, seqs)) in enumerate(zip(prompts, results, strict=True)):
        prefix_text = tokenizer.decode(prompt) if body.echo else ""
        for seq_index, ch in enumerate(seqs):
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
    response = CompletionResponse(
        id=sub.id, created=sub.created, model=sub.model, choices=choices, usage=sub.tally.usage()
    )
    return JSONResponse(response.model_dump())


async def stream_completion(
    sub: streams.Submission, prompts: list[list[int]], body: CompletionRequest, fmt: LogprobFormatter
) -> AsyncIterator[str]:
    n = body.n
    offsets: dict[int, int] = {}
    echoed: set[int] = set()

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        c = CompletionResponse(id=sub.id, created=sub.created, model=sub.model, choices=choices, usage=usage)
        return streams.sse(c.model_dump(exclude=None if usage else {"usage"}))

    try:
        async for i, out in streams.outputs(sub):
            if out.error:
                yield streams.sse_error(out.error)
                return
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
            for d in streams.changed(out):
                index = i * n + d.index
                lp = None
                if body.logprobs is not None:
                    lp = fmt.completion([], None, d.token_ids, d.logprobs, body.logprobs, offset=offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp.tokens)
                choices.append(CompletionChoice(index=index, text=d.text, logprobs=lp, finish_reason=d.finish_reason))
            if choices:
                yield chunk(choices)
        if streams.include_usage(body):
            yield chunk([], sub.tally.usage())
        yield streams.SSE_DONE
    finally:  # client gone (generator cancelled) or done: make sure the engine frees everything
        sub.abort()
