"""The FastAPI routes of one model endpoint, over an ``OpenAIServer``.

``build_fastapi_app(server)`` is what the Ray Serve deployment serves (and what unit tests
drive in-process). Every error answer, including unknown routes and unexpected failures, has
the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from eyas.serve.api import APIError, error_body
from eyas.serve.server import OpenAIServer

log = logging.getLogger(__name__)


def build_fastapi_app(server: OpenAIServer) -> FastAPI:
    """Routes: /health, /v1/models, /v1/chat/completions, /v1/completions, /v1/server_info."""
    app = FastAPI(title=f"eyas: {server.model}", docs_url=None, redoc_url=None,
                  openapi_url=None)
    _add_error_handlers(app)

    def auth(request: Request) -> None:
        server.authorize(request.headers.get("authorization"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        try:
            server.backend.check_health()
        except RuntimeError as exc:
            raise APIError(503, f"unhealthy: {exc}", "server_error") from None
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        auth(request)
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        auth(request)
        server.check_model(model_id)
        return server.model_card()

    @app.get("/v1/server_info")
    @app.get("/get_server_info")
    async def server_info(request: Request) -> dict[str, Any]:
        auth(request)
        return server.server_info()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        auth(request)
        return await server.chat(await request.body())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        auth(request)
        return await server.completions(await request.body())

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """OpenAI-style bodies for our errors, routing errors and anything unexpected."""

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(f"{exc.detail}: see /v1/models, /v1/chat/completions, "
                                       "/v1/completions, /v1/server_info, /health",
                                       "invalid_request_error", code=code),
                            status_code=exc.status_code)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}",
                                       "server_error"), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
