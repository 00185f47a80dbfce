"""From an OpenAI request to what the engine runs: the preset (placement), the prompt's token ids and the
``SamplingParams``. Plain functions over the request model, shared by the completions and chat endpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.api.errors import APIError
from serving.auto_preset import AutoPreset
from serving.presets import AUTO, PresetError
from serving.protocol import ChatCompletionRequest, CompletionRequest
from serving.sampling import SamplingParams
from serving.types import EngineClient
from supernet.placement import Placement, PlacementError

OpenAIRequest = CompletionRequest | ChatCompletionRequest


@dataclass
class Resolved:
    """The preset a request runs on."""

    model_id: str  # echoed back in responses
    preset: str
    placement: Placement


def resolve_model(
    body: OpenAIRequest,
    engine: EngineClient,
    allow_custom_placement: bool = False,
    auto: AutoPreset | None = None,
    auto_unavailable: str = "the auto preset is not enabled on this server",
) -> Resolved:
    """Model id ``<model>`` or ``<model>:<preset>``, or a ``preset`` / ``vllm_xargs.preset`` field; an
    explicit ``placement`` only when the server allows it. Preset ``auto`` picks one by the load
    (serving.auto_preset); the response's model id then names the chosen one, ``<model>:<chosen>``."""
    name, presets = engine.info.name, engine.info.presets
    from_id = None
    if body.model != name:
        from_id = body.model[len(name) + 1 :] if body.model.startswith(name + ":") else None
        if from_id not in presets.presets and from_id != AUTO:  # auto: a 400 below says why when it is off
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
        if not allow_custom_placement:
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
                f"model `{body.model}` selects preset {from_id!r} but the request also asks for preset {preset!r}",
                param="preset",
            )
    chosen = preset or from_id or presets.default
    if chosen == AUTO:
        if auto is None:
            raise APIError(400, f"preset 'auto': {auto_unavailable}", param="preset", code="preset_not_found")
        choice = auto.choose(rows=body.n)
        p = presets.get(choice.preset)
        return Resolved(f"{name}:{p.name}", p.name, p.placement)
    try:
        p = presets.get(chosen)
    except PresetError as err:
        raise APIError(400, str(err), param="preset", code="preset_not_found") from None
    return Resolved(body.model, p.name, p.placement)


def speculative_flag(body: OpenAIRequest) -> bool | None:
    """``speculative`` (or ``vllm_xargs.speculative``): force self-speculative decoding on or off."""
    flag = body.speculative if body.speculative is not None else (body.vllm_xargs or {}).get("speculative")
    if flag is not None and not isinstance(flag, bool):
        raise APIError(400, f"speculative must be true or false, got {flag!r}", param="speculative")
    return flag


def sampling_params(
    body: OpenAIRequest, max_tokens: int, vocab_size: int, logprobs: int | None, prompt_logprobs: int | None
) -> SamplingParams:
    """The request's sampling fields, checked; fields this server cannot honour are refused, not ignored."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by this server (send 0)", param=name)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    for t in body.stop_token_ids or []:
        if not 0 <= t < vocab_size:
            raise APIError(
                400,
                f"stop_token_ids: {t} is not a token id (vocabulary size {vocab_size})",
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


def completion_prompts(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """``prompt`` as text, token ids, or a list of either -> one list of token ids per prompt."""
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


def chat_prompt(body: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """The messages through the tokenizer's chat template, as token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt)
    except Exception as err:  # jinja errors (e.g. a template that rejects a role order)
        raise APIError(400, f"cannot apply the chat template: {err}", param="messages") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError(400, "the chat prompt is empty", param="messages")
    return ids
