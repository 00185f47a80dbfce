"""``create_app``: the FastAPI application over an engine -- lifespan (engine thread start and drain), error
handlers, /health, /metrics, and the endpoint routers (models, completions, chat)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serving.api import chat, completions, models
from serving.api.deps import ServerSettings, get_engine, get_metrics
from serving.api.errors import APIError, error_response, install_error_handlers
from serving.metrics import ServingMetrics
from serving.types import EngineClient

log = logging.getLogger("serving.api")

ROUTERS = (models.router, completions.router, chat.router)

__all__ = ["ServerSettings", "create_app"]


def create_app(
    engine: EngineClient, settings: ServerSettings | None = None, metrics: ServingMetrics | None = None
) -> FastAPI:
    settings = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = getattr(engine, "start", None)
        if start is not None:
            start()
        presets = engine.info.presets
        log.info(
            "serving %s with presets %s (default %s, from %s)",
            engine.info.name,
            ", ".join(presets.names),
            presets.default,
            presets.source,
        )
        yield
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            await asyncio.to_thread(shutdown, settings.shutdown_timeout)

    app = FastAPI(title="supernet", lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    install_error_handlers(app, metrics)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    for router in ROUTERS:
        app.include_router(router)
    return app


async def health(request: Request) -> Response:
    if not getattr(get_engine(request), "accepting", True):
        return error_response(503, "shutting down")
    return JSONResponse({"status": "ok"})


async def prometheus(request: Request) -> Response:
    metrics = get_metrics(request)
    if metrics is None:
        raise APIError(404, "metrics are disabled")
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
