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
         key: str | None = KEY, content_type: str | None = "application/json"
         ) -> httpx.Response:
    """One request through the ASGI app (streams arrive whole)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content_type is not None and body is not None:
        headers["Content-Type"] = content_type

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
    ({"prompt": [403] * 512}, 400, "context_length_exceeded"),  # OpenAI's status, not 413
    ({"prompt": "cat " * 5000}, 400, "context_length_exceeded"),  # cut before tokenizing
    ({"prompt": "hi", "stop_token_ids": [5, 99999]}, 400, "invalid_value"),
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
    with pytest.raises(ValueError, match="EYAS_NOT_SET_ANYWHERE") as info:
        OpenAIServer(ServeConfig(model=str(stories260k), api_key_env="EYAS_NOT_SET_ANYWHERE"),
                     backend=object(), tokenizer=object())
    assert "runtime_env.env_vars" not in str(info.value)  # no longer recommended: Ray logs it


def test_api_key_from_a_file(tmp_path) -> None:
    from eyas.api_key import read_api_key

    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    assert read_api_key(str(key_file), None) == "file-key"
    with pytest.raises(ValueError, match="cannot be read"):
        read_api_key(str(tmp_path / "absent"), None)
    key_file.write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(str(key_file), None)


def test_api_key_in_runtime_env_is_refused() -> None:
    with pytest.raises(ValueError, match="api_key_file"):
        ServeConfig(model="m", api_key_env="K", deployment={"ray_actor_options": {
            "runtime_env": {"env_vars": {"K": "sekret"}}}})


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


# ----------------------------------------------------------------------------- speculation


def test_adaptive_speculation_is_shown_in_server_info(stories260k, tmp_path) -> None:
    """speculative.speculation: adaptive reaches the engine; /v1/server_info shows the mode,
    each setting's share of the decode rounds, and predicted vs measured round time."""
    import json as json_module

    from eyas.draft.model import DraftConfig, Eagle3Draft
    from eyas.export.writer import save_draft

    target_cfg = json_module.loads((stories260k / "config.json").read_text())
    draft = Eagle3Draft(DraftConfig.from_target_config(target_cfg, 512, aux_layer_ids=[0, 2, 3]))
    save_draft(draft, tmp_path / "draft", dtype="float32")
    srv = OpenAIServer(ServeConfig(model=str(stories260k), served_model_name=MODEL,
                                   engine={"max_batch_size": 2},
                                   speculative={"draft_path": str(tmp_path / "draft"),
                                                "speculation": "adaptive"}))
    try:
        assert srv.backend.engine.policy.seen == set(srv.backend.engine.policy.settings)
        assert completion(srv, max_tokens=24)["usage"]["completion_tokens"] > 1
        info = call(srv, "GET", "/v1/server_info", key=None).json()
    finally:
        srv.shutdown()
    assert info["speculative"]["speculation"] == "adaptive"
    backend = info["backend_info"]
    assert backend["speculative"]["speculation"] == "adaptive"
    rounds = backend["speculation_rounds"]
    assert sum(r["rounds"] for r in rounds.values()) >= 1  # calibration rounds are not counted
    assert sum(r["share"] for r in rounds.values()) == pytest.approx(1.0)
    assert set(rounds) <= {"plain", "chain 1/1/2", "chain 2/1/3", "chain 3/1/4"}
    overall = backend["round_time"]
    assert overall["predicted_ms"] > 0 and overall["measured_ms"] > 0


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


# ----------------------------------------------------------------------------- hostile clients


@pytest.mark.parametrize("body", [
    b'{"model": "stories260k", "prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}",  # RecursionError
    b'{"model": "stories260k", "prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}",  # int digits
    b'{"model": "stories260k", "prompt": "a\\ud800b"}',  # lone surrogate (tokenizer TypeError)
    b'{"model": "stories260k", "messages": [{"role": "user", "content": "\\udfff"}]}',
    b'{"model": "stories260k", "prompt": "hi", "temperature": NaN}',
    b'{"model": "stories260k", "prompt": "hi", "\\ud800": 1}',  # unknown field named badly
])
def test_hostile_bodies_are_400_not_500(server, body) -> None:
    route = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    r = call(server, "POST", route, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] in ("invalid_json", "invalid_value")


def test_tiny_temperature_and_top_p_are_greedy_not_nan(server) -> None:
    greedy = completion(server, max_tokens=16)["choices"][0]["text"]
    for knobs in ({"temperature": 1e-39}, {"temperature": 1.0, "top_p": 1e-46, "seed": 3},
                  {"temperature": 1e-44, "top_p": 1e-300}):
        assert completion(server, max_tokens=16, **knobs)["choices"][0]["text"] == greedy, knobs


def test_sampling_guards_nan_and_floors() -> None:
    import torch

    from eyas.engine.sampling import probs_from_logits

    logits = torch.tensor([[0.0, 3.0, 1.0], [0.5, 0.1, 0.2], [float("nan"), 1.0, 0.0],
                           [1.0, float("inf"), 0.0]])
    probs = probs_from_logits(logits, torch.tensor([1e-39, 1.0, 1.0, 1.0]),
                              torch.zeros(4, dtype=torch.long),
                              torch.tensor([1.0, 1e-46, 1.0, 1.0]))
    assert torch.isfinite(probs).all()
    assert probs.argmax(-1).tolist() == [1, 0, 1, 1] and (probs.max(-1).values == 1).all()


@pytest.mark.parametrize("ctype", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_non_json_content_type_is_415(server, ctype) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    r = call(server, "POST", "/v1/completions", body, content_type=ctype)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    ok = call(server, "POST", "/v1/completions", body,
              content_type="application/json; charset=utf-8")
    assert ok.status_code == 200, ok.text


def test_stop_token_ids_are_capped_and_range_checked(server) -> None:
    r = call(server, "POST", "/v1/completions",
             {"model": MODEL, "prompt": "hi", "stop_token_ids": list(range(520_000))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"
    r = call(server, "POST", "/v1/completions",
             {"model": MODEL, "prompt": "hi", "stop_token_ids": [-1]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("stop_token_ids")


# Fakes for the HTTP layer: a backend whose streams finish, hang or fail on request.


class FakeTokenizer:
    """TEST DOUBLE: three ids per prompt; ``delay_s`` of blocking work per call (a huge prompt)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def __call__(self, text: str) -> dict:
        time.sleep(self.delay_s)
        return {"input_ids": [1, 2, 3]}

    def __len__(self) -> int:
        return 100


class FakeStream:
    def __init__(self, mode: str) -> None:
        self.mode, self.sent, self.closed = mode, 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        from eyas.serve.backends.base import GenerationChunk

        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "fail":
            raise RuntimeError("CUDA error at 0xdeadbeef in /secret/path.py")
        if self.sent == 2:
            raise StopAsyncIteration
        self.sent += 1
        return GenerationChunk("x", 1, 3, self.sent, "length" if self.sent == 2 else None)

    async def aclose(self) -> None:
        self.closed = True


class FakeBackend:
    """TEST DOUBLE of ``Backend``: ``mode`` = ok | hang | fail | raise (generate itself)."""

    name, max_context = "fake", 64

    def __init__(self, mode: str = "ok") -> None:
        self.mode, self.streams = mode, []

    async def generate(self, request_id, prompt_ids, params):
        if self.mode == "raise":
            raise RuntimeError("KeyError: '/secret/path.py'")
        self.streams.append(FakeStream(self.mode))
        return self.streams[-1]

    def info(self) -> dict:
        return {}

    def round_stats(self) -> None:
        return None

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def fake_server(mode: str = "ok", delay_s: float = 0.0, **cfg) -> OpenAIServer:
    return OpenAIServer(ServeConfig(model="fake", **cfg), backend=FakeBackend(mode),
                        tokenizer=FakeTokenizer(delay_s))


@pytest.mark.parametrize("mode", ["raise", "fail"])
def test_server_faults_are_500_without_exception_text(mode, caplog) -> None:
    srv = fake_server(mode)
    r = call(srv, "POST", "/v1/completions", {"model": "fake", "prompt": "hi"}, key=None)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text and "Error" not in r.text, r.text
    assert "secret" in caplog.text  # the cause is in the log, once
    assert srv.admission.active == 0
    streamed = call(srv, "POST", "/v1/completions",
                    {"model": "fake", "prompt": "hi", "stream": True}, key=None)
    assert "secret" not in streamed.text and srv.admission.active == 0


def test_request_timeout_ends_hanging_generation() -> None:
    srv = fake_server("hang", request_timeout_s=0.3)
    started = time.monotonic()
    r = call(srv, "POST", "/v1/completions", {"model": "fake", "prompt": "hi"}, key=None)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    s = call(srv, "POST", "/v1/completions", {"model": "fake", "prompt": "hi", "stream": True},
             key=None)
    assert '"code":"request_timeout"' in s.text and s.text.endswith("data: [DONE]\n\n")
    assert time.monotonic() - started < 5
    assert all(st.closed for st in srv.backend.streams) and srv.admission.active == 0


def test_admission_bounds_the_queue_with_503_and_retry_after() -> None:
    from eyas.serve.api import APIError
    from eyas.serve.server import Admission

    async def go() -> None:
        adm = Admission(limit=2, queue=1)
        await adm.acquire()
        await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert adm.waiting == 1 and not waiter.done()
        with pytest.raises(APIError) as info:
            await adm.acquire()
        assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}
        adm.release()  # hands its place to the waiter
        await asyncio.wait_for(waiter, 1)
        assert adm.active == 2 and adm.waiting == 0
        cancelled = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        adm.release()
        adm.release()
        assert adm.active == 0

    asyncio.run(go())


def test_full_replica_answers_503_with_retry_after() -> None:
    srv = fake_server("hang", deployment={"max_ongoing_requests": 1}, max_queued_requests=0)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_fastapi_app(srv))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"model": "fake", "prompt": "hi", "stream": True}
            hanging = asyncio.create_task(c.post("/v1/completions", json=body))
            while srv.admission.active == 0:
                await asyncio.sleep(0.01)
            r = await c.post("/v1/completions", json=body)
            hanging.cancel()
            return r

    r = asyncio.run(go())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"


def test_tokenizing_runs_off_the_event_loop() -> None:
    """A prompt that takes 1 s to tokenize must not stall /health."""
    srv = fake_server(delay_s=1.0)

    async def go() -> float:
        transport = httpx.ASGITransport(app=build_fastapi_app(srv))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            slow = asyncio.create_task(c.post("/v1/completions",
                                              json={"model": "fake", "prompt": "big"}))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            assert (await c.get("/health")).status_code == 200
            took = time.monotonic() - started
            assert (await slow).status_code == 200
            return took

    assert asyncio.run(go()) < 0.5


async def asgi_call(app, method: str, chunks: list[bytes | None], headers: dict[str, str],
                    stall_s: float = 0.0) -> tuple[int | None, bytes, int]:
    """Drive an ASGI app by hand: the body in ``chunks`` (None: the client disconnects; after
    the last one the client stalls ``stall_s``). Returns (status, body, chunks consumed)."""
    queue = list(chunks)
    consumed = 0
    out: dict = {"status": None, "body": b""}

    async def receive():
        nonlocal consumed
        if not queue:
            await asyncio.sleep(stall_s)
            return {"type": "http.disconnect"}
        chunk = queue.pop(0)
        consumed += 1
        if chunk is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("t", 80), "client": ("c", 1),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    await app(scope, receive, send)
    return out["status"], out["body"], consumed


JSON_CT = {"content-type": "application/json"}


def test_body_limit_from_content_length_and_while_reading() -> None:
    app = build_fastapi_app(fake_server(max_request_bytes=4096))
    status, _, consumed = asyncio.run(asgi_call(
        app, "POST", [b"x" * 1024] * 100, JSON_CT | {"content-length": str(10**9)}))
    assert status == 413 and consumed == 0  # refused from the header, nothing read
    status, body, consumed = asyncio.run(asgi_call(app, "POST", [b"x" * 1024] * 100, JSON_CT))
    assert status == 413 and consumed == 5, consumed  # stopped just past 4 KiB
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_stalled_body_gets_408() -> None:
    app = build_fastapi_app(fake_server(body_timeout_s=0.3))
    started = time.monotonic()
    status, body, _ = asyncio.run(asgi_call(app, "POST", [b'{"model": '], JSON_CT, stall_s=60))
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 5


def test_client_disconnect_is_one_quiet_line(caplog) -> None:
    import logging

    app = build_fastapi_app(fake_server())
    with caplog.at_level(logging.DEBUG):
        status, _, _ = asyncio.run(asgi_call(app, "POST", [b'{"mo', None], JSON_CT))
    assert status is None  # nothing is sent to a client that left
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    mine = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(mine) == 1 and mine[0].exc_info is None
