"""The FastAPI app over a real eyas engine (stories260k), in-process without Ray: response and
stream formats, limits and errors, auth, stop strings, seeds, abort on close, and engine
failures (a test-double engine whose step raises)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from eyas.serve.config import ServeConfig
from eyas.serve.routes import build_fastapi_app
from eyas.serve.server import OpenAIServer

MODEL = "stories260k"
KEY = "sekret"


@pytest.fixture(scope="module")
def server(stories260k: Path):
    import os

    os.environ["EYAS_UNIT_KEY"] = KEY
    try:
        srv = OpenAIServer(ServeConfig(model=str(stories260k), served_model_name=MODEL,
                                       api_key_env="EYAS_UNIT_KEY", max_tokens_limit=300,
                                       engine={"max_batch_size": 2}))
    finally:
        del os.environ["EYAS_UNIT_KEY"]
    yield srv
    srv.shutdown()


def call(server: OpenAIServer, method: str, path: str, body: dict | bytes | None = None,
         key: str | None = KEY) -> httpx.Response:
    """One request through the ASGI app (streams arrive whole)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_fastapi_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            return await c.request(method, path, content=None if body is None else content,
                                   headers=headers)

    return asyncio.run(go())


def events(resp: httpx.Response) -> list:
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text.endswith("data: [DONE]\n\n")
    return [json.loads(line[6:]) for line in resp.text.split("\n\n")
            if line.startswith("data: {")]


def completion(server, **kw) -> dict:
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0} | kw
    r = call(server, "POST", "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r if kw.get("stream") else r.json()


# ----------------------------------------------------------------------------- formats


def test_chat_stream_format_and_usage(server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Once upon a time"}],
            "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = events(call(server, "POST", "/v1/chat/completions", body))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks[1:] if c["choices"] and "content" in c["choices"][0]["delta"]]
    cumulative = [c["usage"]["completion_tokens"] for c in content]
    assert cumulative == sorted(cumulative) and cumulative[-1] <= 12
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "length"}
    final = chunks[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 12
    assert final["usage"]["spec"] == {"verify_steps": 11, "accepted_tokens": 0,
                                      "acceptance_length": 1.0}
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == completion(server, max_tokens=12)["choices"][0]["text"]


def test_stop_strings_cut_the_text_in_both_modes(server) -> None:
    full = completion(server, max_tokens=40)["choices"][0]["text"]
    assert "Lily" in full
    cut = completion(server, max_tokens=40, stop=["Lily", "zzz"])
    assert cut["choices"][0] == {"index": 0, "text": full[: full.index("Lily")],
                                 "logprobs": None, "finish_reason": "stop"}
    streamed = events(completion(server, max_tokens=40, stop="Lily", stream=True))
    assert "".join(c["choices"][0]["text"] for c in streamed) == full[: full.index("Lily")]


def test_seeded_sampling_is_reproducible(server) -> None:
    def sample(seed: int) -> str:
        return completion(server, max_tokens=30, temperature=1.0, seed=seed)["choices"][0]["text"]

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


# ----------------------------------------------------------------------------- errors and auth


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"prompt": "hi", "max_tokens": 301}, 400, "invalid_value"),  # over max_tokens_limit
    ({"prompt": [1] + [403] * 400, "max_tokens": 200}, 400, "context_length_exceeded"),
    ({"prompt": [403] * 512}, 413, "context_length_exceeded"),
    ({"prompt": [1, 99999]}, 400, "invalid_value"),
    ({"prompt": []}, 400, None),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model_not_found"),
])
def test_limits_and_bad_prompts(server, body, status, code) -> None:
    r = call(server, "POST", "/v1/completions", {"model": MODEL} | body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_chat_template_rejections_are_400(server) -> None:
    body = {"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}
    r = call(server, "POST", "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_auth_and_open_health(server) -> None:
    assert call(server, "GET", "/v1/models", key=None).status_code == 401
    r = call(server, "GET", "/v1/models", key="wrong")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert call(server, "GET", "/v1/models").json()["data"][0]["id"] == MODEL
    assert call(server, "GET", "/v1/models/stories260k").json()["max_model_len"] == 512
    assert call(server, "GET", "/v1/models/other").status_code == 404
    assert call(server, "GET", "/health", key=None).json() == {"status": "ok"}
    missing = call(server, "GET", "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert call(server, "GET", "/v1/completions").status_code == 405


def test_api_key_env_must_be_set(stories260k) -> None:
    with pytest.raises(ValueError, match="EYAS_NOT_SET_ANYWHERE"):
        OpenAIServer(ServeConfig(model=str(stories260k), api_key_env="EYAS_NOT_SET_ANYWHERE"),
                     backend=object(), tokenizer=object())


# ----------------------------------------------------------------------------- abort


def test_closing_a_stream_aborts_and_frees_the_slot(server) -> None:
    from eyas.engine.sampling import SamplingParams

    backend = server.backend

    async def go() -> int:
        stream = await backend.generate("abort-me", [1, 403, 407],
                                        SamplingParams(max_tokens=400, ignore_eos=True))
        first = await stream.__anext__()
        await stream.aclose()
        return first.completion_tokens

    assert asyncio.run(go()) < 400
    deadline = time.monotonic() + 10
    while backend.engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not backend.engine.has_unfinished()
    assert backend.engine.num_free_slots == backend.max_batch_size


# ----------------------------------------------------------------------------- engine failures


class FailingEngine:
    """TEST DOUBLE of the engine's serving surface: every step raises."""

    def __init__(self) -> None:
        self.pending: set[str] = set()
        self.lock = threading.Lock()

    def add_request(self, request_id, prompt_ids, params) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        with self.lock:
            self.pending.add(request_id)

    def abort(self, request_id) -> bool:
        with self.lock:
            return self.pending.discard(request_id) is None

    def has_unfinished(self) -> bool:
        return bool(self.pending)

    def step(self):
        raise RuntimeError("CUDA error: device-side assert")


def test_a_failing_step_fails_its_requests_not_the_loop() -> None:
    from eyas.serve.backends.eyas_engine import EngineLoop

    engine = FailingEngine()
    loop = EngineLoop(engine, idle_wait_s=0.01)
    got: list = []
    with pytest.raises(ValueError, match="empty"):
        loop.submit("bad", [], None, got.append).result(timeout=5)
    for i in range(3):
        loop.submit(f"r{i}", [1], None, got.append).result(timeout=5)
        deadline = time.monotonic() + 5
        while len(got) <= i and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(got) == 3 and all(isinstance(e, RuntimeError) for e in got)
    assert "device-side assert" in str(got[0]) and loop.alive and loop.failures == 3
    assert not engine.pending  # every failed request was aborted
    loop.stop()
