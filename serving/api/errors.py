"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every failure path:
our own checks (APIError), engine refusals (EngineError), pydantic validation, routing and crashes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.metrics import ServingMetrics
from serving.protocol import ErrorInfo, ErrorResponse
from serving.types import EngineError

log = logging.getLogger("serving.api")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """A request the HTTP layer refuses; ``param`` names the offending field as OpenAI does."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def install_error_handlers(app: FastAPI, metrics: ServingMetrics | None) -> None:
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
        return validation_error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal server error: {type(err).__name__}")


def validation_error_response(err: RequestValidationError) -> JSONResponse:
    """Malformed JSON -> ``invalid_json``; wrong types -> ``invalid_type`` naming the first bad field."""
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
        return error_response(400, f"Malformed JSON body: {detail}", code="invalid_json")
    parts: list[str] = []
    param = None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        # a union reports every alternative; its first location is the field the client got wrong
        name = loc[0] if loc else "body"
        param = param or name
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return error_response(400, "Invalid request: " + "; ".join(dict.fromkeys(parts)), param=param, code="invalid_type")
