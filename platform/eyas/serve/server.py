"""The OpenAI-compatible request handling, independent of Ray (the deployment wraps it).

``OpenAIServer`` turns a request body into prompt token ids (chat requests through the target's
own chat template, ``eyas.data.chat.generation_prompt_ids``), checks it against the context and
the limits, runs it on the backend, and answers a JSON object or an SSE stream. Every input
problem is an ``APIError`` (400/401/404/413) with an OpenAI-style body; a closed or cancelled
response aborts the request in the engine (``GenerationStream.aclose``).

The event loop never does long work: prompt length is bounded in characters before tokenizing,
and tokenizing (and the chat template) runs on a worker thread. ``Admission`` bounds the
generation requests of a replica (running + waiting; the rest get 503 with ``Retry-After``), and
every generation ends after ``request_timeout_s``. Server faults answer a fixed message naming
the request id; their details go to the replica's log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from eyas.api_key import read_api_key
from eyas.serve.api import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SpecUsage,
    Usage,
    chat_response,
    completion_response,
    error_body,
    new_id,
    parse_request,
    sse,
    stream_chunk,
    usage_chunk,
)
from eyas.serve.backends import Backend, GenerationChunk, GenerationStream, make_backend
from eyas.serve.config import ServeConfig
from eyas.serve.stats import ServeStats

log = logging.getLogger(__name__)


def load_serving_tokenizer(cfg: ServeConfig) -> Any:
    """The target's tokenizer with its chat template (local dir, assets:, or a hub id)."""
    from eyas.data.chat import load_tokenizer
    from eyas.targets import resolve_target

    key = "tokenizer" if cfg.tokenizer else "model"
    path = resolve_target(cfg.tokenizer or cfg.model, key)
    if os.path.isdir(path):
        return load_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class Admission:
    """Generation requests of one replica: ``limit`` run at once, ``queue`` more wait in arrival
    order, the rest are refused with 503 and ``Retry-After`` (so a flood cannot pile up
    unbounded work). Not thread-safe: used from the replica's event loop only."""

    RETRY_AFTER_S = 1

    def __init__(self, limit: int, queue: int) -> None:
        self.limit, self.queue = limit, queue
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return sum(not f.done() for f in self._waiters)

    async def acquire(self) -> None:
        if self.active < self.limit and not self.waiting:
            self.active += 1
            return
        if self.waiting >= self.queue:
            raise APIError(503, f"this replica is at capacity ({self.active} requests running, "
                           f"{self.waiting} waiting); retry shortly", "server_error",
                           code="overloaded", headers={"Retry-After": str(self.RETRY_AFTER_S)})
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its place over: ``active`` stays as it is
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the place arrived as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1


def make_usage(chunk: GenerationChunk) -> Usage:
    """OpenAI usage plus the speculative extension (``spec`` and ``spec_verify_ct``)."""
    spec = chunk.spec
    return Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                 total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
                 spec_verify_ct=spec.verify_steps if spec else None,
                 spec=SpecUsage(verify_steps=spec.verify_steps,
                                accepted_tokens=spec.accepted_tokens,
                                acceptance_length=spec.acceptance_length) if spec else None)


async def within(stream: GenerationStream, deadline: float) -> AsyncIterator[GenerationChunk]:
    """The stream's chunks; TimeoutError once the event loop's clock passes ``deadline``.

    Each wait is bounded on its own (no timeout scope stays open across a ``yield``, where its
    cancellation could land in the consumer instead)."""
    loop = asyncio.get_running_loop()
    it = stream.__aiter__()
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError
        try:
            yield await asyncio.wait_for(it.__anext__(), remaining)
        except StopAsyncIteration:
            return


class _Tracker:
    """Feeds one request's progress into ``ServeStats`` (TTFT, tokens, finish)."""

    def __init__(self, stats: ServeStats, request_id: str, arrival: float) -> None:
        self.stats, self.id, self.arrival = stats, request_id, arrival
        self.reason = "abort"  # unless the stream reports how it finished
        self.final: GenerationChunk | None = None
        self._first = True
        stats.start(request_id)

    def chunk(self, chunk: GenerationChunk) -> None:
        if self._first and chunk.text:
            self._first = False
            self.stats.first_token(self.id, time.monotonic() - self.arrival)
        self.stats.tokens(chunk.new_tokens)
        if chunk.finish_reason is not None:
            self.reason, self.final = chunk.finish_reason, chunk

    def done(self) -> None:
        spec = self.final.spec if self.final else None
        self.stats.finish(self.id, self.reason, time.monotonic() - self.arrival, spec)


class OpenAIServer:
    """One model endpoint: tokenizer, backend, limits, auth and statistics."""

    def __init__(self, cfg: ServeConfig, backend: Backend | None = None,
                 tokenizer: Any | None = None) -> None:
        self.cfg = cfg
        self.model = cfg.model_name
        self._api_key = read_api_key(cfg.api_key_file, cfg.api_key_env)
        self.tokenizer = tokenizer if tokenizer is not None else load_serving_tokenizer(cfg)
        self.backend = backend if backend is not None else make_backend(cfg, self.tokenizer)
        self.stats = ServeStats(self.model, rounds=self.backend.round_stats)
        self.created = int(time.time())
        self.admission = Admission(cfg.deployment.max_ongoing_requests, cfg.max_queued_requests)

    # ------------------------------------------------------------------ simple endpoints

    def authorize(self, authorization: str | None) -> None:
        """401 unless auth is off or the header is ``Bearer <the key>``."""
        if self._api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self._api_key.encode()):
            raise APIError(401, "missing or invalid API key: send the header "
                           "'Authorization: Bearer <key>'", code="invalid_api_key")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "eyas",
                "max_model_len": self.backend.max_context}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def server_info(self) -> dict[str, Any]:
        """Acceptance length and load of THIS replica, plus the backend's state."""
        spec = self.cfg.speculative
        return {"model": self.model, "backend": self.backend.name,
                "speculative": spec.model_dump() if spec else None,
                **self.stats.snapshot(), "backend_info": self.backend.info()}

    def check_model(self, model: str) -> None:
        if model != self.model:
            raise APIError(404, f"model {model!r} does not exist here; this server serves "
                           f"{self.model!r} (see GET /v1/models)", param="model",
                           code="model_not_found")

    # ------------------------------------------------------------------ completions

    async def chat(self, body: bytes) -> Response:
        """``POST /v1/chat/completions``."""
        arrival = time.monotonic()
        req = parse_request(ChatCompletionRequest, body, self.cfg.max_request_bytes)
        self.check_model(req.model)
        messages = req.template_messages()
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        prompt_ids = await asyncio.to_thread(self._chat_prompt, messages)
        return await self._run(req, prompt_ids, chat=True, arrival=arrival)

    async def completions(self, body: bytes) -> Response:
        """``POST /v1/completions``."""
        arrival = time.monotonic()
        req = parse_request(CompletionRequest, body, self.cfg.max_request_bytes)
        self.check_model(req.model)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            self._check_chars(len(prompt), "prompt")
            prompt_ids = await asyncio.to_thread(self._tokenize, prompt)
        else:
            prompt_ids = self._check_ids(prompt, "prompt")
        return await self._run(req, prompt_ids, chat=False, arrival=arrival)

    def _check_chars(self, chars: int, param: str) -> None:
        """400 before tokenizing a prompt no context could hold (tokenizing megabytes is slow)."""
        limit = self.cfg.max_prompt_chars or 32 * self.backend.max_context
        if chars > limit:
            raise APIError(400, f"the prompt has {chars} characters, more than this server "
                           f"tokenizes ({limit}) for a context of {self.backend.max_context} "
                           "tokens; shorten it", param=param, code="context_length_exceeded")

    def _chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        from eyas.data.chat import ChatTemplateError, generation_prompt_ids

        try:
            return generation_prompt_ids(self.tokenizer, messages, self.model)
        except ChatTemplateError as exc:
            raise APIError(400, f"messages cannot be rendered with the model's chat template: "
                           f"{exc}", param="messages", code="invalid_messages") from None

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param} token ids {bad[:5]} are outside the vocabulary "
                           f"[0, {vocab})", param=param, code="invalid_value")
        return list(ids)

    def _max_tokens(self, req: Any, prompt_len: int, param: str) -> int:
        """The request's max_tokens, checked against the limit and the context window."""
        ctx = self.backend.max_context
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty; send some text", param=param)
        if prompt_len >= ctx:
            raise APIError(400, f"the prompt has {prompt_len} tokens but the model's context is "
                           f"{ctx} tokens; shorten it", param=param,
                           code="context_length_exceeded")
        room, asked = ctx - prompt_len, req.requested_max_tokens()
        if asked is None:
            return min(self.cfg.default_max_tokens, self.cfg.max_tokens_limit, room)
        if asked > self.cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={asked} exceeds this server's limit of "
                           f"{self.cfg.max_tokens_limit}", param="max_tokens",
                           code="invalid_value")
        if asked > room:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens={asked} "
                           f"exceeds the context of {ctx} tokens; ask for at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        return asked

    async def _run(self, req: Any, prompt_ids: list[int], chat: bool,
                   arrival: float) -> Response:
        param = "messages" if chat else "prompt"
        params = req.sampling_params(self._max_tokens(req, len(prompt_ids), param))
        self._check_ids(params.stop_token_ids, "stop_token_ids")
        rid = new_id("chatcmpl" if chat else "cmpl")
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s
        await self.admission.acquire()
        try:
            stream = await self.backend.generate(rid, prompt_ids, params)
        except ValueError as exc:
            self.admission.release()
            raise APIError(400, f"the engine rejected the request: {exc}", param=param) from None
        except BaseException:
            self.admission.release()
            raise
        if req.stream:
            return StreamingResponse(self._sse(rid, req, stream, chat, arrival, deadline),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, final = await self._collect(rid, stream, arrival, deadline)
        build = chat_response if chat else completion_response
        return JSONResponse(build(rid, self.model, text, final.finish_reason, make_usage(final)))

    async def _collect(self, rid: str, stream: GenerationStream, arrival: float,
                       deadline: float) -> tuple[str, GenerationChunk]:
        """Run a non-streaming request to the end: (text, last chunk)."""
        tracker, parts = _Tracker(self.stats, rid, arrival), []
        try:
            async with contextlib.aclosing(stream):
                async for chunk in within(stream, deadline):
                    tracker.chunk(chunk)
                    parts.append(chunk.text)
        except TimeoutError:
            tracker.reason = "timeout"
            raise APIError(504, f"the request ran longer than this server's limit of "
                           f"{self.cfg.request_timeout_s:g} s; ask for fewer tokens",
                           "server_error", code="request_timeout") from None
        except Exception as exc:  # noqa: BLE001 - any backend failure is this request's 500
            tracker.reason = "error"
            log.warning("request %s failed: %s: %s", rid, type(exc).__name__, exc)
            raise APIError(500, f"generation failed (request {rid}); the server logged the "
                           "cause", "server_error") from None
        finally:
            tracker.done()
            self.admission.release()
        if tracker.final is None:
            raise APIError(500, "the backend ended the request without a finish reason",
                           "server_error")
        return "".join(parts), tracker.final

    async def _sse(self, rid: str, req: Any, stream: GenerationStream, chat: bool,
                   arrival: float, deadline: float) -> AsyncIterator[bytes]:
        """The SSE body: content chunks, a finish chunk, the usage chunk, ``[DONE]``."""
        created = int(time.time())
        tracker = _Tracker(self.stats, rid, arrival)

        def chunk_of(**kw: Any) -> bytes:
            return sse(stream_chunk(rid, self.model, chat, created,
                                    include_usage=req.include_usage, **kw))

        try:
            async with contextlib.aclosing(stream):
                if chat:
                    yield chunk_of(text="", role=True)
                async for chunk in within(stream, deadline):
                    tracker.chunk(chunk)
                    usage = make_usage(chunk) if req.continuous_usage else None
                    if chunk.text:
                        yield chunk_of(text=chunk.text, usage=usage)
                    if chunk.finish_reason is not None:
                        yield chunk_of(finish_reason=chunk.finish_reason, usage=usage)
            if req.include_usage and tracker.final is not None:
                yield sse(usage_chunk(rid, self.model, chat, created, make_usage(tracker.final)))
        except TimeoutError:
            tracker.reason = "timeout"
            yield sse(error_body(f"the request ran longer than this server's limit of "
                                 f"{self.cfg.request_timeout_s:g} s", "server_error",
                                 code="request_timeout"))
        except Exception as exc:  # noqa: BLE001 - headers are sent: report it in the stream
            tracker.reason = "error"
            log.warning("request %s failed mid-stream: %s: %s", rid, type(exc).__name__, exc)
            yield sse(error_body(f"generation failed (request {rid}); the server logged the "
                                 "cause", "server_error"))
        finally:
            tracker.done()
            self.admission.release()
        yield SSE_DONE

    def shutdown(self) -> None:
        self.backend.shutdown()
