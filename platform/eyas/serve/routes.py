"""The FastAPI routes of one model endpoint, over an ``OpenAIServer``.

``build_fastapi_app(server)`` is what the Ray Serve deployment serves (and what unit tests
drive in-process). Every error answer, including unknown routes and unexpected failures, has
the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``; a 5xx never carries an
exception's text (that goes to the log, with the request's reference).

``BodyGuard`` (an ASGI middleware) receives POST bodies before any route sees them: 415 unless
the Content-Type is JSON, 413 from the Content-Length header (a body up to ``DRAIN_FACTOR`` x
the limit is read and dropped first, so the client sees the answer) or as soon as the bytes
read pass ``max_request_bytes`` (never the whole body in memory first), 408 when the body has not arrived
within ``body_timeout_s`` (a client that sends half a body and stalls holds nothing for long).
A client that disconnects is one INFO line, not an error with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from eyas.serve.api import APIError, error_body
from eyas.serve.server import OpenAIServer

log = logging.getLogger(__name__)


def build_fastapi_app(server: OpenAIServer) -> FastAPI:
    """Routes: /health, /v1/models, /v1/chat/completions, /v1/completions, /v1/server_info."""
    app = FastAPI(title=f"eyas: {server.model}", docs_url=None, redoc_url=None,
                  openapi_url=None)
    _add_error_handlers(app)
    app.add_middleware(BodyGuard, max_bytes=server.cfg.max_request_bytes,
                       timeout_s=server.cfg.body_timeout_s)

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
        headers = dict(exc.headers or {})
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers or None)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(f"{exc.detail}: see /v1/models, /v1/chat/completions, "
                                       "/v1/completions, /v1/server_info, /health",
                                       "invalid_request_error", code=code),
                            status_code=exc.status_code)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _json_error(status: int, message: str, type_: str = "invalid_request_error",
                code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(error_body(message, type_, code=code), status_code=status,
                        headers=headers)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


class _Gone(Exception):
    """The client disconnected while its body was being read."""


DRAIN_FACTOR = 4  # a declared body up to 4x the limit is read and dropped before the 413; larger: refused at once


class BodyGuard:
    """ASGI middleware: checks and receives POST bodies (see the module doc), then replays the
    body to the app; catches what escapes the app (a disconnect: one INFO line; anything else:
    one log line with a reference id and a 500 without the exception's text)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if scope["method"] == "POST":
                body = await self._receive_body(scope, receive)
                if isinstance(body, Response):
                    await body(scope, receive, send)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, tracked_send)
        except (_Gone, ClientDisconnect) as exc:
            log.info("client disconnected during %s %s (%s)", scope["method"], scope["path"],
                     type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - the last resort for a bug: log, answer 500
            ref = uuid.uuid4().hex[:12]
            log.error("internal error %s on %s %s: %s: %s", ref, scope["method"], scope["path"],
                      type(exc).__name__, exc)
            if not started:
                await _json_error(500, f"internal error (reference {ref})",
                                  "server_error")(scope, receive, send)

    async def _receive_body(self, scope: Scope, receive: Receive) -> bytes | Response:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        ctype = headers.get("content-type", "")
        if not _is_json(ctype):
            return _json_error(415, f"Content-Type must be application/json, got "
                               f"{ctype[:100] or 'none'!r}", code="unsupported_media_type")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= DRAIN_FACTOR * self.max_bytes:
                await self._drain(receive)
            return self._too_large(int(length))
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Gone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:  # stop reading: the rest is never received
                        return self._too_large(None)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            return _json_error(408, f"the request body did not arrive within "
                               f"{self.timeout_s:g} s ({size} bytes came)",
                               code="request_timeout", headers={"Connection": "close"})

    async def _drain(self, receive: Receive) -> None:
        """Read and drop a moderately oversized body, so the client (still sending) gets the 413
        instead of a reset: closing with unread bytes makes the TCP stack discard the answer."""
        with contextlib.suppress(TimeoutError, _Gone):
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Gone
                    if not message.get("more_body", False):
                        return

    def _too_large(self, size: int | None) -> Response:
        what = f"of {size} bytes " if size is not None else ""
        return _json_error(413, f"request body {what}exceeds the limit of {self.max_bytes} "
                           "bytes", code="request_too_large", headers={"Connection": "close"})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the client's later
    messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
