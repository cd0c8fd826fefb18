"""The serving app under hostile and careless clients, over real HTTP: uvicorn serving the eyas
app over a real stories260k engine in its own process (``tests/serve_http_server.py``).

- A property-based fuzz (hypothesis) of >= 500 malformed requests: mutated fields, wrong JSON
  types, raw bytes, odd content types and routes. Bar: no 5xx, every error in the OpenAI shape,
  the server process unchanged, ``/health`` fine afterwards.
- The cases a session found by hand (deep nesting, 5,000-digit ints, lone surrogates, tiny
  temperature/top_p, a huge Content-Length, a 4 MB prompt, 520k stop ids).
- 40 connections that send half a body and stall: ``/health`` and a normal request still
  answer within 2 s, and the stalled ones get 408 after ``body_timeout_s``.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_http_server import EyasHTTPServer

pytestmark = pytest.mark.integration

MODEL = "stories260k"
BODY_TIMEOUT_S = 3.0
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Once upon a time"}]}
COMPLETION = {"model": MODEL, "prompt": "Once upon a time"}


@pytest.fixture(scope="module")
def app(stories260k):
    srv = EyasHTTPServer(str(stories260k), body_timeout_s=BODY_TIMEOUT_S, request_timeout_s=60)
    yield srv
    srv.close()


def post(url: str, body: bytes, content_type: str | None = "application/json",
         timeout: float = 30) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return httpx.post(url, content=body, headers=headers, timeout=timeout)


def assert_handled(r: httpx.Response, what: object) -> None:
    """No 5xx; a 4xx has the OpenAI error shape."""
    assert r.status_code < 500, (what, r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err


# ----------------------------------------------------------------------------- fuzz

# Text with lone UTF-16 surrogates (which JSON can carry as \ud800 escapes) among the rest.
NASTY_TEXT = st.text(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=12)
LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False) | NASTY_TEXT)
JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
WEIRD = st.sampled_from([
    1e-46, 1e-39, 5e-324, -1.0, 2.0000001, 1e308, -0.0, 2**63, -(2**63) - 1, 2**64, "\ud800",
    "\udfff x", "", " ", "x" * 3000, [], {}, None, True, [[]], [-1], [2**31], [0.5],
    [{"role": "user", "content": "\ud83d"}], [{"role": "user"}], [{"type": "text"}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}], {"include_usage": "yes"},
    ["a"] * 10, list(range(100)),
])
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed", "user",
          "ignore_eos", "stop_token_ids", "logprobs", "echo", "suffix", "presence_penalty",
          "tools", "\ud800"]
CONTENT_TYPES = st.sampled_from(["application/json"] * 6 + [
    "application/json; charset=utf-8", "text/plain", None, "multipart/form-data",
    "application/problem+json", "application/jsonx"])


@st.composite
def mutated(draw) -> bytes:
    """A valid body with 1-3 fields replaced by odd JSON or deleted."""
    body = dict(draw(st.sampled_from([CHAT, COMPLETION])))
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()) and field in body:
            del body[field]
        else:
            body[field] = draw(WEIRD | JSON)
    if draw(st.booleans()):
        body.update(stream=True, max_tokens=draw(st.integers(1, 8)))
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates become \ud800 escapes


@st.composite
def nasty_text(draw) -> bytes:
    """A well-formed request whose prompt, message or stop text is odd Unicode."""
    text = draw(NASTY_TEXT)
    body = dict(draw(st.sampled_from([CHAT, COMPLETION])))
    where = draw(st.sampled_from(["content", "prompt", "parts", "stop", "model"]))
    if where == "content" and "messages" in body:
        body["messages"] = [{"role": "user", "content": text}]
    elif where == "parts" and "messages" in body:
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    elif where in ("stop", "model"):
        body[where] = text
    else:
        body.pop("messages", None)
        body["prompt"] = draw(st.sampled_from([text, [text]]))
    return json.dumps(body | {"max_tokens": 2}).encode()


@st.composite
def broken(draw) -> bytes:
    """Bytes that are not a request: a cut body, random bytes, a non-object JSON value, deep
    nesting, or an integer past Python's digit limit."""
    kind = draw(st.sampled_from(["cut", "bytes", "value", "deep", "digits"]))
    if kind == "deep":
        depth = draw(st.integers(100, 20_000))
        return b'{"model": "stories260k", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "digits":
        digits = draw(st.integers(1000, 20_000))
        return b'{"model": "stories260k", "prompt": "x", "seed": ' + b"7" * digits + b"}"
    if kind == "cut":
        full = json.dumps(draw(st.sampled_from([CHAT, COMPLETION]))).encode()
        return full[:draw(st.integers(0, len(full) - 1))]
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return json.dumps(draw(JSON)).encode()


REQUESTS = st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
                     mutated() | nasty_text() | broken(), CONTENT_TYPES)
SENT: list[int] = []


def test_fuzzed_requests_never_get_5xx(app) -> None:
    SENT.clear()

    @settings(max_examples=520, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(REQUESTS)
    def one(request) -> None:
        route, body, ctype = request
        SENT.append(1)
        assert_handled(post(app.url + route, body, ctype), (route, body[:200], ctype))

    started = time.monotonic()
    one()
    assert len(SENT) >= 500, len(SENT)
    assert app.alive and app.proc.pid == app.pid
    assert httpx.get(f"{app.url}/health", timeout=5).json() == {"status": "ok"}
    assert time.monotonic() - started < 120


# ----------------------------------------------------------------------------- known cases


HOSTILE = [
    b'{"model": "stories260k", "prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}",
    b'{"model": "stories260k", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"model": "stories260k", "prompt": "a\\ud800"}',
    b'{"model": "stories260k", "messages": [{"role": "user", "content": "\\ud800"}]}',
    json.dumps(COMPLETION | {"stop_token_ids": list(range(520_000))}).encode(),
    json.dumps(COMPLETION | {"prompt": "story " * 700_000}).encode(),  # 4.2 MB > the limit
    json.dumps(COMPLETION | {"prompt": "story " * 600_000}).encode(),  # 3.6 MB, under it
]


@pytest.mark.parametrize("i", range(len(HOSTILE)))
def test_known_hostile_bodies_are_4xx_fast(app, i) -> None:
    route = "/v1/chat/completions" if b'"messages"' in HOSTILE[i][:60] else "/v1/completions"
    started = time.monotonic()
    r = post(app.url + route, HOSTILE[i])
    assert 400 <= r.status_code < 500, r.text[:300]
    assert_handled(r, i)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("knobs", [{"temperature": 1e-39}, {"top_p": 1e-46, "seed": 1}])
def test_tiny_sampling_knobs_decode_greedily(app, knobs) -> None:
    def text(**kw) -> str:
        r = post(f"{app.url}/v1/completions",
                 json.dumps(COMPLETION | {"max_tokens": 12} | kw).encode())
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert text(**knobs) == text(temperature=0)


def open_stalled(url: str, n: int, declared: int = 4096) -> list[socket.socket]:
    """``n`` connections that send headers and half a body, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                  f"application/json\r\nContent-Length: {declared}\r\n\r\n".encode()
                  + b'{"model": "stories260k", "prompt": "')
        socks.append(s)
    return socks


def test_huge_content_length_is_refused_before_the_body(app) -> None:
    (s,) = open_stalled(app.url, 1, declared=200_000_000)
    try:
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    finally:
        s.close()


def test_stalled_bodies_do_not_block_others_and_time_out(app) -> None:
    socks = open_stalled(app.url, 40)
    try:
        started = time.monotonic()
        assert httpx.get(f"{app.url}/health", timeout=2).status_code == 200
        r = post(f"{app.url}/v1/completions", json.dumps(COMPLETION | {"max_tokens": 4}).encode(),
                 timeout=2)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 2
        for s in socks:  # each stalled upload is answered 408 once body_timeout_s passes
            s.settimeout(BODY_TIMEOUT_S + 10)
            assert s.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for s in socks:
            s.close()
