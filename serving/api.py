"""The OpenAI-compatible HTTP layer (FastAPI). It parses and validates requests, resolves the preset,
tokenizes, hands ``GenerationRequest``s to an engine (serving.types.EngineClient) and formats what comes back
-- it knows nothing about caches or batching, so another engine (vLLM) can sit behind it unchanged.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics.
Errors use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.metrics import ServingMetrics
from serving.presets import PresetError
from serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
)
from serving.sampling import SamplingParams, TokenLogprobs
from serving.types import EngineClient, EngineError, GenerationRequest, RequestOutput
from supernet.placement import Placement, PlacementError

log = logging.getLogger("serving.api")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status)


@dataclass
class ServerSettings:
    api_key: str | None = None
    allow_custom_placement: bool = False
    shutdown_timeout: float = 30.0


@dataclass
class Resolved:
    """The preset a request runs on."""

    model_id: str  # echoed back in responses
    preset: str
    placement: Placement


@dataclass
class _Choice:
    """Accumulates one choice of a non-streaming response."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


def create_app(
    engine: EngineClient, settings: ServerSettings | None = None, metrics: ServingMetrics | None = None
) -> FastAPI:
    settings = settings or ServerSettings()
    info = engine.info
    tokenizer = engine.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        start = getattr(engine, "start", None)
        if start is not None:
            start()
        log.info(
            "serving %s with presets %s (default %s, from %s)",
            info.name,
            ", ".join(info.presets.names),
            info.presets.default,
            info.presets.source,
        )
        yield
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            await asyncio.to_thread(shutdown, settings.shutdown_timeout)

    app = FastAPI(title="supernet", lifespan=lifespan)
    app.state.engine = engine

    def reject(status: int) -> None:
        if metrics is not None:
            metrics.rejected.labels(str(status)).inc()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        reject(err.status)
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, err: EngineError) -> JSONResponse:
        reject(err.status)
        return error_response(err.status, str(err), code=err.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        reject(400)
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
            return error_response(400, f"Malformed JSON body: {detail}", code="invalid_json")
        parts, param = [], None
        for e in errors:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            # a union reports every alternative; its first location is the field the client got wrong
            name = loc[0] if loc else "body"
            param = param or name
            parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
        return error_response(
            400, "Invalid request: " + "; ".join(dict.fromkeys(parts)), param=param, code="invalid_type"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal server error: {type(err).__name__}")

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    auth = [Depends(check_key)]

    # ---- endpoints ------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if not getattr(engine, "accepting", True):
            return error_response(503, "shutting down")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        if metrics is None:
            raise APIError(404, "metrics are disabled")
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        presets = info.presets
        cards = [
            ModelCard(
                id=info.name,
                root=info.name,
                max_model_len=info.max_model_len,
                preset=presets.default,
                placement=presets.get(presets.default).spec,
            )
        ]
        cards += [
            ModelCard(
                id=f"{info.name}:{p.name}",
                root=info.name,
                max_model_len=info.max_model_len,
                preset=p.name,
                placement=p.spec,
            )
            for p in presets.presets.values()
        ]
        return ModelList(data=cards)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        resolved = resolve_model(body)
        fmt = LogprobFormatter(tokenizer, body.return_tokens_as_token_ids)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, body.n):
            raise APIError(
                400,
                "best_of must equal n (server-side candidate selection is not supported)",
                param="best_of",
            )
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens < 0 or (max_tokens == 0 and not body.echo):
            raise APIError(
                400,
                f"max_tokens must be at least 1, got {max_tokens} (0 is allowed only with "
                "echo=true, to score the prompt)",
                param="max_tokens",
            )
        prompts = completion_prompts(body.prompt)
        params = sampling_params(
            body,
            max_tokens,
            logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if body.echo else None,  # prompt scoring only when asked
        )
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = submit(rid, prompts, resolved, params)
        created = int(time.time())
        if body.stream:
            gen = stream_completion(rid, created, resolved.model_id, prompts, body, streams, fmt)
            return StreamingResponse(gen, media_type="text/event-stream")
        results = await collect(request, streams)
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
        return JSONResponse(
            CompletionResponse(
                id=rid, created=created, model=resolved.model_id, choices=choices, usage=usage
            ).model_dump()
        )

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        resolved = resolve_model(body)
        fmt = LogprobFormatter(tokenizer, body.return_tokens_as_token_ids)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        prompt = chat_prompt(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, info.max_model_len - len(prompt))  # vLLM's default: the rest of the context
        elif max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        params = sampling_params(
            body,
            max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            prompt_logprobs=None,
        )
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        (stream,) = submit(rid, [prompt], resolved, params)
        created = int(time.time())
        if body.stream:
            gen = stream_chat(rid, created, resolved.model_id, len(prompt), body, stream, fmt)
            return StreamingResponse(gen, media_type="text/event-stream")
        ((_, seqs),) = await collect(request, [stream])
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
            prompt_tokens=len(prompt), completion_tokens=completion, total_tokens=len(prompt) + completion
        )
        return JSONResponse(
            ChatCompletionResponse(
                id=rid, created=created, model=resolved.model_id, choices=choices, usage=usage
            ).model_dump()
        )

    # ---- request -> engine ----------------------------------------------------------------------------

    def resolve_model(body: Any) -> Resolved:
        """Model id ``<model>`` or ``<model>:<preset>``, or a ``preset`` / ``vllm_xargs.preset`` field; an
        explicit ``placement`` only when the server allows it."""
        name, presets = info.name, info.presets
        if body.model == name:
            from_id = None
        elif body.model.startswith(name + ":"):
            from_id = body.model[len(name) + 1 :]
            if from_id not in presets.presets:
                raise APIError(
                    404,
                    f"The model `{body.model}` does not exist. Available: "
                    f"{', '.join([name] + [f'{name}:{p}' for p in presets.names])}",
                    param="model",
                    code="model_not_found",
                )
        else:
            raise APIError(
                404,
                f"The model `{body.model}` does not exist. Available: "
                f"{', '.join([name] + [f'{name}:{p}' for p in presets.names])}",
                param="model",
                code="model_not_found",
            )
        xargs = body.vllm_xargs or {}
        preset = body.preset if body.preset is not None else xargs.get("preset")
        placement = body.placement if body.placement is not None else xargs.get("placement")
        if placement is not None:
            if not settings.allow_custom_placement:
                raise APIError(
                    400,
                    "explicit placements are disabled on this server; pick a preset by model id "
                    "(see /v1/models), or start the server with --allow-custom-placement",
                    param="placement",
                )
            if preset is not None or from_id is not None:
                raise APIError(400, "give either a preset or a placement, not both", param="placement")
            try:
                parsed = engine.placement(str(placement))
            except PlacementError as err:
                raise APIError(400, f"invalid placement: {err}", param="placement") from None
            return Resolved(body.model, "custom", parsed)  # one metrics label for every custom placement
        if preset is not None:
            if not isinstance(preset, str):
                raise APIError(400, f"preset must be a string, got {preset!r}", param="preset")
            if from_id is not None and from_id != preset:
                raise APIError(
                    400,
                    f"model `{body.model}` selects preset {from_id!r} but the request also asks "
                    f"for preset {preset!r}",
                    param="preset",
                )
        chosen = preset or from_id or presets.default
        try:
            p = presets.get(chosen)
        except PresetError as err:
            raise APIError(400, str(err), param="preset", code="preset_not_found") from None
        return Resolved(body.model, p.name, p.placement)

    def sampling_params(
        body: Any, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server (send 0)", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        vocab = len(tokenizer)
        for t in body.stop_token_ids or []:
            if not 0 <= t < vocab:
                raise APIError(
                    400,
                    f"stop_token_ids: {t} is not a token id (vocabulary size {vocab})",
                    param="stop_token_ids",
                )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            n=body.n,
            stop=stop,
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        try:
            params.validate()
        except ValueError as err:
            raise APIError(400, str(err), param=str(err).split(" ")[0]) from None
        return params

    def completion_prompts(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        out = []
        vocab = len(tokenizer)
        for p in prompt:
            ids = tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt is empty; send at least one token", param="prompt")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400,
                    f"prompt contains token id(s) {bad[:5]} outside the vocabulary (size {vocab})",
                    param="prompt",
                )
            out.append(ids)
        return out

    def chat_prompt(body: ChatCompletionRequest) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.add_generation_prompt
            )
        except Exception as err:  # jinja errors (e.g. a template that rejects a role order)
            raise APIError(400, f"cannot apply the chat template: {err}", param="messages") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "the chat prompt is empty", param="messages")
        return ids

    def submit(rid: str, prompts: list[list[int]], resolved: Resolved, params: SamplingParams) -> list:
        streams = []
        try:
            for i, ids in enumerate(prompts):
                req = GenerationRequest(f"{rid}-{i}", ids, resolved.placement, params, preset=resolved.preset)
                streams.append(engine.submit(req))
        except Exception:
            for s in streams:
                s.abort()
            raise
        return streams

    async def collect(request: Request, streams: list) -> list[tuple[list | None, list[_Choice]]]:
        """Run a non-streaming request to the end; a client that hangs up aborts it."""

        async def one(stream) -> tuple[list | None, list[_Choice]]:
            choices: dict[int, _Choice] = {}
            prompt_lps = None
            async for out in stream:
                if out.error:
                    raise APIError(500, out.error)
                if out.prompt_logprobs is not None:
                    prompt_lps = out.prompt_logprobs
                for d in out.deltas:
                    ch = choices.setdefault(d.index, _Choice())
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

    # ---- formatting -----------------------------------------------------------------------------------

    async def stream_completion(
        rid: str,
        created: int,
        model_id: str,
        prompts: list[list[int]],
        body: CompletionRequest,
        streams: list,
        fmt: LogprobFormatter,
    ) -> AsyncIterator[str]:
        n = body.n
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = 0
        offsets: dict[int, int] = {}
        echoed: set[int] = set()
        try:
            async for i, out in merge(streams):
                if out.error:
                    yield sse(
                        {"error": {"message": out.error, "type": "server_error", "param": None, "code": None}}
                    )
                    return
                choices = []
                if body.echo and i not in echoed:  # the prompt once per choice, before its first tokens
                    echoed.add(i)
                    text = tokenizer.decode(prompts[i])
                    for j in range(n):
                        lp = None
                        if body.logprobs is not None and out.prompt_logprobs is not None:
                            lp = fmt.completion(prompts[i], out.prompt_logprobs, [], [], body.logprobs)
                        offsets[i * n + j] = len(text)
                        choices.append(CompletionChoice(index=i * n + j, text=text, logprobs=lp))
                    # a chunk of its own: one choice index per chunk, as clients reassemble them
                    yield sse(
                        CompletionResponse(
                            id=rid, created=created, model=model_id, choices=choices
                        ).model_dump(exclude={"usage"})
                    )
                    choices = []
                for d in out.deltas:
                    completion_tokens += len(d.token_ids)
                    if not (d.text or d.token_ids or d.finish_reason):
                        continue
                    index = i * n + d.index
                    lp = None
                    if body.logprobs is not None:
                        lp = fmt.completion(
                            [], None, d.token_ids, d.logprobs, body.logprobs, offset=offsets.get(index, 0)
                        )
                        offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp.tokens)
                    choices.append(
                        CompletionChoice(index=index, text=d.text, logprobs=lp, finish_reason=d.finish_reason)
                    )
                if choices:
                    yield sse(
                        CompletionResponse(
                            id=rid, created=created, model=model_id, choices=choices
                        ).model_dump(exclude={"usage"})
                    )
            if body.stream_options and body.stream_options.include_usage:
                usage = Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens,
                )
                yield sse(
                    CompletionResponse(
                        id=rid, created=created, model=model_id, choices=[], usage=usage
                    ).model_dump()
                )
            yield "data: [DONE]\n\n"
        finally:  # client gone (generator cancelled) or done: make sure the engine frees everything
            for s in streams:
                s.abort()

    async def stream_chat(
        rid: str,
        created: int,
        model_id: str,
        prompt_tokens: int,
        body: ChatCompletionRequest,
        stream,
        fmt: LogprobFormatter,
    ) -> AsyncIterator[str]:
        completion_tokens = 0

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(id=rid, created=created, model=model_id, choices=choices, usage=usage)
            data = c.model_dump(exclude=None if usage else {"usage"})
            for choice in data["choices"]:  # deltas carry only what changed, as OpenAI sends them
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            return sse(data)

        try:
            yield chunk(
                [
                    ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
                    for j in range(body.n)
                ]
            )
            async for out in stream:
                if out.error:
                    yield sse(
                        {"error": {"message": out.error, "type": "server_error", "param": None, "code": None}}
                    )
                    return
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
                yield chunk(
                    [],
                    Usage(
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens,
                    ),
                )
            yield "data: [DONE]\n\n"
        finally:
            stream.abort()

    return app


class LogprobFormatter:
    """Token strings and logprob blocks in the completions (legacy) and chat shapes."""

    def __init__(self, tokenizer: Any, ids_as_text: bool = False) -> None:
        self.tokenizer, self.ids_as_text = tokenizer, ids_as_text

    def token_str(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.ids_as_text else self.tokenizer.decode([token_id])

    def completion(
        self,
        prompt: list[int],
        prompt_lps: list | None,
        token_ids: list[int],
        lps: list[TokenLogprobs],
        k: int,
        offset: int = 0,
    ) -> CompletionLogprobs:
        """Echoed prompt entries (when given), then generated ones; text_offset counts characters."""
        out = CompletionLogprobs()
        entries = list(zip(prompt, prompt_lps, strict=True)) if prompt_lps is not None else []
        entries += list(zip(token_ids, lps, strict=True))
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
            top = {
                self.token_str(i): lp for i, lp in zip(entry.top_ids[:k], entry.top_logprobs[:k], strict=True)
            }
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


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def merge(streams: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as their outputs arrive, tagged with the stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
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
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()
