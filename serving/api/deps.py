"""What every endpoint shares, reached through ``request.app.state`` (set by ``create_app``): the engine, the
server's settings, the API-key check, and the opening every generation endpoint shares."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from serving.api.errors import APIError
from serving.api.logprobs import LogprobFormatter
from serving.api.params import OpenAIRequest, Resolved, resolve_model
from serving.auto_preset import AutoPreset
from serving.metrics import ServingMetrics
from serving.types import EngineClient


@dataclass
class ServerSettings:
    api_key: str | None = None
    allow_custom_placement: bool = False
    shutdown_timeout: float = 30.0
    auto: AutoPreset | None = None  # the auto preset (serving.auto_preset), when the presets support it
    auto_unavailable: str = "the auto preset is not enabled on this server"  # why not, for the 400


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> ServingMetrics | None:
    return request.app.state.metrics


async def check_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server has a key (compared in constant time)."""
    api_key = get_settings(request).api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(
            401,
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


def open_request(body: OpenAIRequest, request: Request) -> tuple[EngineClient, Resolved, LogprobFormatter]:
    """What every generation endpoint starts with: the engine, the preset the request runs on (404/400 for a
    bad model id or preset), and the request's logprob formatter."""
    engine, settings = get_engine(request), get_settings(request)
    resolved = resolve_model(
        body, engine, settings.allow_custom_placement, settings.auto, settings.auto_unavailable
    )
    return engine, resolved, LogprobFormatter(engine.tokenizer, body.return_tokens_as_token_ids)
