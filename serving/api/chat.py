"""POST /v1/chat/completions: the tokenizer's chat template, ``n`` samples, chat-shaped logprobs, streamed
(deltas carry only what changed, as OpenAI sends them) or not."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from serving.api import streams
from serving.api.deps import check_api_key, open_request
from serving.api.errors import APIError
from serving.api.logprobs import LogprobFormatter
from serving.api.params import chat_prompt, sampling_params
from serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    Usage,
)

router = APIRouter(dependencies=[Depends(check_api_key)])


def chat_max_tokens(body: ChatCompletionRequest, prompt_len: int, max_model_len: int) -> int:
    """``max_completion_tokens`` over ``max_tokens``; neither -> vLLM's default, the rest of the context."""
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        return max(1, max_model_len - prompt_len)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    return max_tokens


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    engine, resolved, fmt = open_request(body, request)
    tokenizer = engine.tokenizer
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    prompt = chat_prompt(body, tokenizer)
    max_tokens = chat_max_tokens(body, len(prompt), engine.info.max_model_len)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, len(tokenizer), logprobs=top, prompt_logprobs=None)
    sub = streams.submit(request, body, "chatcmpl", [prompt], resolved, params)
    if body.stream:
        return streams.sse_response(stream_chat(sub, body, fmt))
    ((_, seqs),) = await streams.collect(request, sub)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=c.text),
            finish_reason=c.finish_reason,
            logprobs=fmt.chat(c.logprobs) if body.logprobs else None,
        )
        for i, c in enumerate(seqs)
    ]
    response = ChatCompletionResponse(
        id=sub.id, created=sub.created, model=sub.model, choices=choices, usage=sub.tally.usage()
    )
    return JSONResponse(response.model_dump())


async def stream_chat(
    sub: streams.Submission, body: ChatCompletionRequest, fmt: LogprobFormatter
) -> AsyncIterator[str]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        c = ChatCompletionChunk(id=sub.id, created=sub.created, model=sub.model, choices=choices, usage=usage)
        data = c.model_dump(exclude=None if usage else {"usage"})
        for choice in data["choices"]:  # deltas carry only what changed, as OpenAI sends them
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return streams.sse(data)

    try:
        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content="")) for j in range(body.n)])
        async for _, out in streams.outputs(sub):
            if out.error:
                yield streams.sse_error(out.error)
                return
            choices = [
                ChatChunkChoice(
                    index=d.index,
                    delta=DeltaMessage(content=d.text) if d.text else DeltaMessage(),
                    logprobs=fmt.chat(d.logprobs) if body.logprobs else None,
                    finish_reason=d.finish_reason,
                )
                for d in streams.changed(out)
            ]
            if choices:
                yield chunk(choices)
        if streams.include_usage(body):
            yield chunk([], sub.tally.usage())
        yield streams.SSE_DONE
    finally:
        sub.abort()
