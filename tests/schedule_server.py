"""A real OpenAI-compatible streaming HTTP server whose tokens arrive on a known schedule.

Token ``i`` (0-based) of a response is due ``ttft + i * gap`` after the request reached the
handler. The first chunk carries token 0 alone at ``ttft``; later chunks carry up to
``tokens_per_chunk`` tokens and leave when their last token is due, like a speculative decoder
emitting several tokens per verify step. So TTFT = ttft, E2E = ttft + (n - 1) * gap and
TPOT = gap exactly, for any n (= the request's ``max_tokens``). Deadlines are absolute, so a
late wake-up never accumulates, and all waits are asyncio sleeps, so the schedule holds for
many concurrent streams. The final usage chunk carries the true ``completion_tokens`` and
``spec_verify_ct`` (= the number of content chunks); with
``stream_options.continuous_usage_stats`` every chunk carries the cumulative usage.

Admin routes for tests: ``GET /admin/stats`` (requests seen, most in flight, arrival times),
``POST /admin/config`` (``ttft_ms``, ``gap_ms``, ``tokens_per_chunk``, ``slow_first`` +
``slow_ttft_ms``, ``fault_period`` + ``faults`` {index mod period: "500" | "drop" | "garbage" |
"hang"}, ``hang_s``) which also resets the statistics.

Run: ``python tests/schedule_server.py [--port 0]``; it prints ``PORT <n>`` once listening.
``ScheduleServer`` starts it as a subprocess for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULTS: dict[str, Any] = {"ttft_ms": 200.0, "gap_ms": 20.0, "tokens_per_chunk": 3,
                            "slow_first": 0, "slow_ttft_ms": 1000.0, "fault_period": 0,
                            "faults": {}, "hang_s": 3.0}


@dataclass
class State:
    """Configuration plus statistics; replaced on every config change, so a handler still
    running from an earlier test updates its own (discarded) statistics."""

    cfg: dict[str, Any]
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list[float] = field(default_factory=list)

    def fault(self, index: int) -> str | None:
        period = self.cfg["fault_period"]
        return self.cfg["faults"].get(str(index % period)) if period else None


@dataclass
class Box:
    """The current State (an app's items must not be replaced once it runs)."""

    state: State


def chunk_schedule(n: int, ttft: float, gap: float, k: int) -> list[tuple[float, int]]:
    """(send offset in s, tokens) per content chunk for an n-token response."""
    out, i = [(ttft, 1)], 1
    while i < n:
        j = min(i + k, n)
        out.append((ttft + (j - 1) * gap, j - i))
        i = j
    return out


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def content_chunk(chat: bool, text: str, usage: dict[str, int] | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    chunk: dict[str, Any] = {"id": "x", "object": "chunk", "choices": [choice]}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


async def stream_tokens(request: web.Request, resp: web.StreamResponse, st: State, t0: float,
                        n: int, chat: bool, continuous: bool, index: int) -> int | None:
    """Write the content chunks on schedule; the number of chunks, or None if the stream was
    cut on purpose (faults "drop" and "hang")."""
    loop, fault = asyncio.get_running_loop(), st.fault(index)
    ttft = st.cfg["slow_ttft_ms"] if index < st.cfg["slow_first"] else st.cfg["ttft_ms"]
    sched = chunk_schedule(n, ttft / 1e3, st.cfg["gap_ms"] / 1e3, int(st.cfg["tokens_per_chunk"]))
    sent = 0
    for c, (offset, ntok) in enumerate(sched):
        await asyncio.sleep(max(0.0, t0 + offset - loop.time()))
        if c == 1 and fault == "hang":
            await asyncio.sleep(st.cfg["hang_s"])
            return None  # the client has timed out by now; end without the rest
        if c == 1 and fault == "drop":
            request.transport.close()
            return None
        if c == 1 and fault == "garbage":
            await resp.write(b"data: {this is not json\n\n")
        sent += ntok
        text = "".join(f"w{sent - ntok + t} " for t in range(ntok))
        usage = {"prompt_tokens": 5, "completion_tokens": sent} if continuous else None
        await resp.write(sse(content_chunk(chat, text, usage)))
    return len(sched)


async def completions(request: web.Request, chat: bool) -> web.StreamResponse:
    loop, st = asyncio.get_running_loop(), request.app["box"].state
    t0 = loop.time()
    index = st.requests
    st.requests += 1
    st.arrivals.append(time.time())
    body = await request.json()
    if st.fault(index) == "500":
        return web.json_response({"error": {"message": "injected fault"}}, status=500)
    n = int(body.get("max_tokens", 16))
    continuous = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        await resp.prepare(request)
        if chat:  # real servers open with a role-only chunk that carries no token
            await resp.write(sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
        chunks = await stream_tokens(request, resp, st, t0, n, chat, continuous, index)
    except ConnectionResetError:  # the client left (it saw a fault, or timed out)
        chunks = None
    finally:
        st.in_flight -= 1  # before [DONE]: the client may start its next request right after
    if chunks is not None:
        with contextlib.suppress(ConnectionResetError):
            await finish(resp, n, chunks)
    return resp


async def finish(resp: web.StreamResponse, n: int, chunks: int) -> None:
    """Finish reason, the usage chunk with the true token count, ``[DONE]``."""
    usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5,
             "spec_verify_ct": chunks}
    await resp.write(sse({"choices": [{"index": 0, "finish_reason": "length", "delta": {}}]}))
    await resp.write(sse({"choices": [], "usage": usage}))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()


async def chat_route(request: web.Request) -> web.StreamResponse:
    return await completions(request, chat=True)


async def text_route(request: web.Request) -> web.StreamResponse:
    return await completions(request, chat=False)


async def stats_route(request: web.Request) -> web.Response:
    st = request.app["box"].state
    return web.json_response({"requests": st.requests, "in_flight": st.in_flight,
                              "max_in_flight": st.max_in_flight, "arrivals": st.arrivals})


async def config_route(request: web.Request) -> web.Response:
    cfg = {**request.app["base_cfg"], **(await request.json())}
    request.app["box"].state = State(cfg=cfg)
    return web.json_response(cfg)


def make_app(base_cfg: dict[str, Any]) -> web.Application:
    app = web.Application()
    app["base_cfg"] = base_cfg
    app["box"] = Box(state=State(cfg=dict(base_cfg)))
    app.router.add_post("/v1/chat/completions", chat_route)
    app.router.add_post("/v1/completions", text_route)
    app.router.add_get("/admin/stats", stats_route)
    app.router.add_post("/admin/config", config_route)
    return app


async def serve(port: int, base_cfg: dict[str, Any]) -> None:
    runner = web.AppRunner(make_app(base_cfg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    print(f"PORT {site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


class ScheduleServer:
    """The server above in a subprocess on 127.0.0.1 (its own process: its timing does not
    compete with the test's interpreter)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--port", "0"],
                                     stdout=subprocess.PIPE, text=True)
        line = self._read_port_line(timeout_s)
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def _read_port_line(self, timeout_s: float) -> str:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if line.startswith("PORT "):
                return line
            if self.proc.poll() is not None:
                break
        self.close()
        raise RuntimeError("schedule_server did not start; run tests/schedule_server.py by hand")

    def _call(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def configure(self, **cfg: Any) -> dict[str, Any]:
        """Set schedule and faults (unset keys take the defaults) and reset the statistics."""
        return self._call("/admin/config", cfg)

    def stats(self) -> dict[str, Any]:
        return self._call("/admin/stats")

    def close(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server subprocess; kill it when it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port, dict(DEFAULTS)))


if __name__ == "__main__":
    main()
