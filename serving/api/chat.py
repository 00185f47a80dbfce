"""POST /v1/chat/completions: the tokenizer's chat template, ``n`` samples, chat-shaped logprobs, streamed
(deltas carry only what changed, as OpenAI sends them) or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.api.deps import check_api_key, get_settings, open_request
from serving.api.errors import APIError
from serving.api.logprobs import LogprobFormatter
from serving.api.params import chat_prompt, sampling_params, speculative_flag
from serving.api.streams import SSE_DONE, SpecTally, collect, sse, sse_error, submit
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
from serving.types import OutputStream

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
    params = sampling_params(
        body,
        max_tokens,
        len(tokenizer),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        prompt_logprobs=None,
    )
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    (stream,) = submit(engine, rid, [prompt], resolved, params, speculative_flag(body), get_settings(request).auto)
    created = int(time.time())
    if body.stream:
        gen = stream_chat(rid, created, resolved.model_id, len(prompt), body, stream, fmt)
        return StreamingResponse(gen, media_type="text/event-stream")
    tally = SpecTally()
    ((_, seqs),) = await collect(request, [stream], tally)
    completion = sum(len(c.token_ids) for c in seqs)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=c.text),
            finish_reason=c.finish_reason,
            logprobs=fmt.chat(c.logprobs) if body.logprobs else None,
        )
        for i, c in enumerate(seqs)
    ]
    usage = Usage(
        prompt_tokens=len(prompt),
        completion_tokens=completion,
        total_tokens=len(prompt) + completion,
        speculative=tally.usage(),
    )
    return JSONResponse(
        ChatCompletionResponse(
            id=rid, created=created, model=resolved.model_id, choices=choices, usage=usage
        ).model_dump()
    )


async def stream_chat(
    rid: str,
    created: int,
    model_id: str,
    prompt_tokens: int,
    body: ChatCompletionRequest,
    stream: OutputStream,
    fmt: LogprobFormatter,
) -> AsyncIterator[str]:
    completion_tokens = 0
    tally = SpecTally()

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        c = ChatCompletionChunk(id=rid, created=created, model=model_id, choices=choices, usage=usage)
        data = c.model_dump(exclude=None if usage else {"usage"})
        for choice in data["choices"]:  # deltas carry only what changed, as OpenAI sends them
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return sse(data)

    try:
        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content="")) for j in range(body.n)])
        async for out in stream:
            if out.error:
                yield sse_error(out.error)
                return
            tally.see(out)
            choices = []
            for d in out.deltas:
                completion_tokens += len(d.token_ids)
                if not (d.text or d.token_ids or d.finish_reason):
                    continue
                choices.append(
                    ChatChunkChoice(
                        index=d.index,
                        delta=DeltaMessage(content=d.text) if d.text else DeltaMessage(),
                        logprobs=fmt.chat(d.logprobs) if body.logprobs else None,
                        finish_reason=d.finish_reason,
                    )
                )
            if choices:
                yield chunk(choices)
        if body.stream_options and body.stream_options.include_usage:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
                speculative=tally.usage(),
            )
            yield chunk([], usage)
        yield SSE_DONE
    finally:
        stream.abort()
