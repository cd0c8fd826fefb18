"""Streaming client for OpenAI-compatible servers, timing every chunk (aiohttp, asyncio).

Each request is sent with ``stream=true`` and ``stream_options.include_usage=true``; the record
(``metrics.RequestRecord``) holds the start time, the arrival offset of every chunk that carries
content (``delta.content``/``delta.reasoning_content`` for chat, ``text`` for completions), the
cumulative ``usage.completion_tokens`` seen with each such chunk when the server sends usage in
every chunk, the final usage, and the end of the stream (``data: [DONE]`` or EOF after usage).

Speculative-decoding statistics are optional extensions with no standard name; the first of
these found in the last chunk that has them is recorded:
``acceptance_length`` / ``accept_length`` / ``spec_accept_length`` (tokens per verify step) and
``spec_verify_ct`` (verify steps), looked up in ``usage``, in ``usage["spec"]``, at the top
level of the chunk, and in the chunk's ``meta_info`` / ``spec`` / ``speculative`` objects.

Error kinds: ``replica_lost`` (a 5xx whose body is not JSON: Ray Serve's proxy answers so when the
replica serving the request died or none is up, while the app itself answers JSON errors; or a
stream cut after its 200: the server went away mid-answer),
``http_<status>`` (any other non-200 answer), ``timeout`` (``request_timeout_s`` passed),
``connection`` (refused, reset, or closed before the stream finished), ``protocol`` (malformed
SSE/JSON, or a stream without a usage chunk: the server ignores
``stream_options.include_usage``), ``server_error`` (an ``error`` object inside the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from eyas.loadtest.metrics import RequestRecord
from eyas.loadtest.workloads import Prompt

_ACCEPT_KEYS = ("acceptance_length", "accept_length", "spec_accept_length")
_NESTED_KEYS = ("spec", "meta_info", "speculative")


class ProtocolError(Exception):
    """The server's stream is not the OpenAI streaming format."""


class StreamError(Exception):
    """The server reported an error object inside a 200 stream."""


class Clock:
    """Wall-clock seconds read through the monotonic high-resolution counter.

    Differences are as precise as ``perf_counter``, values are comparable across processes on
    one host, and a wall-clock step during the run cannot distort a latency.
    """

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._perf0 = time.perf_counter()

    def now(self) -> float:
        return self._wall0 + (time.perf_counter() - self._perf0)


@dataclass(frozen=True)
class Target:
    """Where and how to send: full URL of the completions route and the request headers."""

    url: str
    headers: dict[str, str]


def completions_url(base_url: str, chat: bool) -> str:
    """``http://h:p`` or ``http://h:p/v1`` -> the chat or text completions route."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + ("/chat/completions" if chat else "/completions")


def make_target(base_url: str, chat: bool, api_key: str | None) -> Target:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return Target(url=completions_url(base_url, chat), headers=headers)


def build_body(prompt: Prompt, model: str, max_tokens: int, temperature: float,
               ignore_eos: bool = False, continuous_usage: bool = False,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of one streaming request for ``prompt``."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if prompt.messages is not None:
        body["messages"] = prompt.messages
    else:
        body["prompt"] = prompt.text
    if continuous_usage:
        body["stream_options"]["continuous_usage_stats"] = True
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    return body


def chunk_content(chunk: dict[str, Any]) -> str:
    """Text a chunk carries (chat delta content or reasoning, or completions text)."""
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        text += choice.get("text") or ""
    return text


def _first_number(d: Any, keys: tuple[str, ...]) -> float | None:
    if not isinstance(d, dict):
        return None
    for k in keys:
        if isinstance(d.get(k), int | float):
            return float(d[k])
    return None


def spec_stats(chunk: dict[str, Any]) -> tuple[float | None, int | None]:
    """(acceptance_length, spec_verify_ct) from any of the places listed in the module doc."""
    usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else {}
    places = [usage, usage.get("spec"), chunk, *(chunk.get(k) for k in _NESTED_KEYS)]
    accept = next((v for p in places if (v := _first_number(p, _ACCEPT_KEYS)) is not None), None)
    verify = next((v for p in places if (v := _first_number(p, ("spec_verify_ct",))) is not None),
                  None)
    return accept, int(verify) if verify is not None else None


def parse_sse_line(line: bytes) -> dict[str, Any] | None | str:
    """One SSE line -> a JSON chunk, ``"done"`` for ``[DONE]``, or None for other lines."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return None  # blank separator, comment, event:/id: lines
    payload = text[5:].strip()
    if payload == "[DONE]":
        return "done"
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"chunk is not JSON: {payload[:200]!r}") from exc
    if not isinstance(chunk, dict):
        raise ProtocolError(f"chunk is not a JSON object: {payload[:200]!r}")
    return chunk


def apply_chunk(rec: RequestRecord, chunk: dict[str, Any], offset_s: float) -> None:
    """Update ``rec`` with one parsed chunk that arrived ``offset_s`` after the start."""
    if "error" in chunk and not chunk.get("choices"):
        raise StreamError(str(chunk["error"])[:500])
    usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else None
    if chunk_content(chunk):
        rec.chunk_times_s.append(offset_s)
        rec.chunk_cum_tokens.append(usage.get("completion_tokens") if usage else None)
    if usage is not None and usage.get("completion_tokens") is not None:
        rec.output_tokens = int(usage["completion_tokens"])
        rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
    accept, verify = spec_stats(chunk)
    rec.acceptance_length = accept if accept is not None else rec.acceptance_length
    rec.spec_verify_ct = verify if verify is not None else rec.spec_verify_ct


async def drain(resp: aiohttp.ClientResponse, limit_s: float = 1.0) -> None:
    """Read what follows ``[DONE]`` (the end of the chunked body) so the connection is kept
    alive for the next request; a server that never ends the body just loses the connection."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        await asyncio.wait_for(resp.content.read(), timeout=limit_s)


async def read_stream(resp: aiohttp.ClientResponse, rec: RequestRecord, clock: Clock) -> None:
    """Consume the SSE body, timestamping chunks as their bytes arrive; ``rec.end`` is the
    arrival of ``[DONE]`` (or of the end of the body when the server sends no ``[DONE]``)."""
    buf = b""
    async for data in resp.content.iter_any():
        arrived = clock.now() - rec.start
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            parsed = parse_sse_line(line)
            if parsed == "done":
                rec.end = rec.start + arrived
                await drain(resp)
                return
            if isinstance(parsed, dict):
                apply_chunk(rec, parsed, arrived)
    if buf.strip():
        parsed = parse_sse_line(buf)
        if isinstance(parsed, dict):
            apply_chunk(rec, parsed, clock.now() - rec.start)


def http_error_kind(status: int, content_type: str) -> str:
    """``replica_lost`` for a 5xx that is not JSON (no OpenAI-compatible app answers that way:
    Ray Serve's proxy does when the replica serving the request died), else ``http_<status>``."""
    if status >= 500 and "json" not in content_type.lower():
        return "replica_lost"
    return f"http_{status}"


def classify(exc: BaseException) -> str:
    """Error kind of an exception raised while sending or streaming."""
    if isinstance(exc, TimeoutError):  # before ClientConnectionError: ServerTimeoutError is both
        return "timeout"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError):
        return "connection"
    if isinstance(exc, StreamError):
        return "server_error"
    return "protocol"  # ProtocolError, malformed HTTP (ClientResponseError), bad encodings


def failure_kind(exc: BaseException, http_status: int | None) -> str:
    """``classify``, except that a connection lost after a 200 (a stream cut mid-answer: the
    replica died while streaming) counts as ``replica_lost`` like the proxy's non-JSON 5xx."""
    kind = classify(exc)
    return "replica_lost" if kind == "connection" and http_status == 200 else kind


async def send_request(session: aiohttp.ClientSession, target: Target, body: dict[str, Any],
                       rec: RequestRecord, clock: Clock, timeout_s: float) -> RequestRecord:
    """Send one streaming request and fill ``rec`` (whose ``start`` is set here); never raises
    for server or network faults: they become ``rec.error_kind``."""
    rec.start = clock.now()
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(target.url, json=body, headers=target.headers,
                                timeout=timeout) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                rec.error = (await resp.text(errors="replace"))[:500]
                rec.error_kind = http_error_kind(resp.status, resp.headers.get("Content-Type", ""))
            else:
                ctype = resp.headers.get("Content-Type", "")
                if "text/event-stream" not in ctype:
                    raise ProtocolError(f"answer is {ctype or 'untyped'}, not text/event-stream: "
                                        "the server ignored stream=true")
                await read_stream(resp, rec, clock)
                if rec.output_tokens is None:
                    raise ProtocolError("stream ended without usage.completion_tokens: the server "
                                        "ignores stream_options.include_usage; use one that "
                                        "supports it")
    except (aiohttp.ClientError, TimeoutError, ProtocolError, StreamError, UnicodeError) as exc:
        rec.error_kind = failure_kind(exc, rec.http_status)
        rec.error = f"{type(exc).__name__}: {exc}"[:500]
    if rec.end is None or rec.error_kind is not None:
        rec.end = clock.now()
    return rec


def new_session(limit: int = 0) -> aiohttp.ClientSession:
    """A session whose pool never queues requests (``limit=0``: one connection per in-flight)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=None))
