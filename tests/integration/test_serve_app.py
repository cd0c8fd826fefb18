"""The Serve app running on local Ray (127.0.0.1): the official openai client, raw HTTP,
greedy EAGLE-3 == baseline, concurrent == sequential, auth, and abort on client disconnect.

Two applications share one Serve instance: ``base`` (plain decoding, /base, a low
``max_ongoing_requests``) and ``eagle`` (EAGLE-3 with a random draft head, API key read from a
file, autoscaling config, /eagle). A random head drafts badly, but greedy speculative output must
equal plain greedy output anyway. The key must appear in no file of the Ray session; stalled
uploads must not lock out /health.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from conftest import files_containing, free_port

pytestmark = pytest.mark.integration

MODEL = "stories260k"
API_KEY = "test-key-123"
PROMPTS = ["Once upon a time", "The little dog", "Tom and Lily went to the park", "One day"]
STALL_TIMEOUT_S = 4.0


def random_draft_dir(stories260k: Path, out: Path) -> Path:
    """An untrained EAGLE-3 head for stories260k, exported as SGLang would load it."""
    import torch

    from eyas.draft.model import DraftConfig, Eagle3Draft
    from eyas.export.writer import save_draft

    torch.manual_seed(0)
    cfg = json.loads((stories260k / "config.json").read_text())
    draft = Eagle3Draft(DraftConfig.from_target_config(cfg, 512, aux_layer_ids=[0, 2, 3]))
    save_draft(draft, out, dtype="float32")
    return out


def app_args(stories260k: Path, **overrides) -> dict:
    base = {"model": str(stories260k), "served_model_name": MODEL,
            "engine": {"max_batch_size": 4, "num_threads": 1},
            "deployment": {"ray_actor_options": {"num_cpus": 0.5}}}
    return base | overrides


@pytest.fixture(scope="module")
def urls(ray_local, stories260k, tmp_path_factory):
    """Deploy both apps; yield their base URLs; shut Serve down afterwards."""
    from ray import serve

    from eyas.serve.app import build_app

    draft = random_draft_dir(stories260k, tmp_path_factory.mktemp("draft"))
    key_file = tmp_path_factory.mktemp("secrets") / "api_key"
    key_file.write_text(API_KEY + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    eagle = app_args(
        stories260k, speculative={"draft_path": str(draft), "num_steps": 3, "eagle_topk": 2,
                                  "num_draft_tokens": 5},
        api_key_file=str(key_file),
        deployment={"autoscaling": {"min_replicas": 1, "max_replicas": 1,
                                    "target_ongoing_requests": 4},
                    "ray_actor_options": {"num_cpus": 0.5}})
    base = app_args(stories260k, body_timeout_s=STALL_TIMEOUT_S, deployment={
        "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 0.5}})
    try:
        serve.run_many([  # both replicas load at the same time
            serve.RunTarget(build_app(base), name="base", route_prefix="/base"),
            serve.RunTarget(build_app(eagle), name="eagle", route_prefix="/eagle")])
        root = f"http://127.0.0.1:{port}"
        yield {"base": f"{root}/base", "eagle": f"{root}/eagle"}
    finally:
        serve.shutdown()


def client(url: str, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def chat_text(url: str, prompt: str, key: str = "unused", **kw) -> tuple[str, object]:
    resp = client(url, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=kw.pop("max_tokens", 40), **kw)
    return resp.choices[0].message.content, resp


# ----------------------------------------------------------------------------- the openai client


def test_chat_and_completions_non_streaming(urls) -> None:
    text, resp = chat_text(urls["base"], "Once upon a time")
    assert text.startswith(", there was a little girl named Lily")
    assert resp.choices[0].finish_reason == "length" and resp.model == MODEL
    usage = resp.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (5, 40, 45)
    assert usage.spec["acceptance_length"] == 1.0 and usage.spec_verify_ct == 39
    comp = client(urls["base"]).completions.create(model=MODEL, prompt="Once upon a time",
                                                   max_tokens=40, temperature=0)
    assert comp.choices[0].text == text  # same ids: the template adds nothing here
    assert [m.id for m in client(urls["base"]).models.list().data] == [MODEL]


@pytest.mark.parametrize("chat", [True, False])
def test_streaming_with_include_usage(urls, chat) -> None:
    c = client(urls["eagle"], API_KEY)
    kw = {"model": MODEL, "max_tokens": 48, "temperature": 0, "stream": True,
          "stream_options": {"include_usage": True}}
    if chat:
        stream = c.chat.completions.create(messages=[{"role": "user", "content": "One day"}], **kw)
    else:
        stream = c.completions.create(prompt="One day", **kw)
    chunks = list(stream)
    pieces = [(ch.choices[0].delta.content if chat else ch.choices[0].text) or ""
              for ch in chunks if ch.choices]
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 48
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])
    assert usage.spec_verify_ct == usage.spec["verify_steps"] >= 1
    assert usage.spec["acceptance_length"] >= 1.0
    want = chat_text(urls["base"], "One day", max_tokens=48)[0]
    assert "".join(pieces) == want


# ----------------------------------------------------------------------------- equality


def test_eagle3_greedy_equals_baseline(urls) -> None:
    for prompt in PROMPTS:
        base, _ = chat_text(urls["base"], prompt, max_tokens=64)
        spec, resp = chat_text(urls["eagle"], prompt, key=API_KEY, max_tokens=64)
        assert spec == base, prompt
        assert resp.usage.spec["verify_steps"] <= resp.usage.completion_tokens
    info = httpx.get(f"{urls['eagle']}/v1/server_info",
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert info["avg_spec_accept_length"] >= 1.0
    assert info["backend_info"]["speculative"] == {"algorithm": "EAGLE3", "num_steps": 3,
                                                   "eagle_topk": 2, "num_draft_tokens": 5,
                                                   "ngram_tokens": 0, "corpus_tokens": 0,
                                                   "max_speculative_batch": None,
                                                   "speculation": "fixed"}
    rounds = info["backend_info"]["speculation_rounds"]
    assert set(rounds) == {"tree 3/2/5"} and rounds["tree 3/2/5"]["share"] == 1.0


def test_concurrent_requests_equal_sequential(urls) -> None:
    from openai import AsyncOpenAI

    sequential = [chat_text(urls["eagle"], p, key=API_KEY, max_tokens=48)[0] for p in PROMPTS]

    async def one(c: AsyncOpenAI, prompt: str) -> str:
        stream = await c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=48, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def all_at_once() -> list[str]:
        c = AsyncOpenAI(base_url=f"{urls['eagle']}/v1", api_key=API_KEY, max_retries=0)
        return await asyncio.gather(*(one(c, p) for p in PROMPTS))

    assert asyncio.run(all_at_once()) == sequential


# ----------------------------------------------------------------------------- errors and auth


BAD = [  # (route, raw body, status, param)
    ("chat/completions", b'{"model": "stories260k", "messages": [', 400, None),
    ("chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}',
     404, "model"),
    ("chat/completions", b'{"model": "stories260k"}', 400, "messages"),
    ("chat/completions", b'{"model": "stories260k", "messages": "hi"}', 400, "messages"),
    ("completions", b'{"model": "stories260k", "prompt": "hi", "max_tokens": -3}', 400,
     "max_tokens"),
    ("completions", b'{"model": "stories260k", "prompt": "hi", "max_tokens": 100000}', 400,
     "max_tokens"),
    ("completions", b'{"model": "stories260k", "prompt": "hi", "temperature": "hot"}', 400,
     "temperature"),
    ("completions", b'{"model": "stories260k", "prompt": "hi", "n": 3}', 400, "n"),
]


def test_bad_input_gets_openai_errors_and_the_replica_survives(urls) -> None:
    long_prompt = json.dumps({"model": MODEL, "prompt": "cat " * 600}).encode()
    cases = [*BAD, ("completions", long_prompt, 400, "prompt")]
    for route, body, status, param in cases:
        r = httpx.post(f"{urls['base']}/v1/{route}", content=body,
                       headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, (body[:80], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param or (param and err["param"].startswith(param)), err
    assert chat_text(urls["base"], "One day", max_tokens=5)[1].usage.completion_tokens == 5


def test_api_key_required(urls) -> None:
    url = f"{urls['eagle']}/v1/models"
    assert httpx.get(url).status_code == 401
    bad = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{urls['eagle']}/health").status_code == 200


# ----------------------------------------------------------------------------- disconnect


def test_client_disconnect_aborts_the_stream(urls) -> None:
    """The EAGLE-3 app (slower per token than plain decoding) would need seconds for 480
    tokens; closing the stream after the first chunk must abort it and free its slot."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30, headers=auth) as c, c.stream(
            "POST", f"{urls['eagle']}/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # generation is under way
    info: dict = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = httpx.get(f"{urls['eagle']}/v1/server_info", headers=auth).json()
        backend = info["backend_info"]
        if (info["finished_requests"].get("abort") and not info["running_requests"]
                and not backend["engine_has_unfinished"]):
            break
        time.sleep(0.1)
    assert info["finished_requests"].get("abort") == 1, info
    backend = info["backend_info"]
    assert not backend["engine_has_unfinished"] and backend["free_slots"] == 4, backend


# ----------------------------------------------------------------------------- hostile clients


def test_stalled_uploads_do_not_lock_out_health(urls) -> None:
    """40 connections send half a body and stall, 10x the app's max_ongoing_requests: /health
    and a normal request still answer within 2 s; the stalled ones get 408."""
    host, rest = urls["base"].removeprefix("http://").split(":")
    port = int(rest.split("/")[0])
    socks = []
    try:
        for _ in range(40):
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"POST /base/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 4096\r\n\r\n{\"model\": ")
            socks.append(s)
        time.sleep(0.5)  # let the proxy hand them all to the replica
        started = time.monotonic()
        assert httpx.get(f"{urls['base']}/health", timeout=2).status_code == 200
        assert chat_text(urls["base"], "One day", max_tokens=3)[1].usage.completion_tokens == 3
        assert time.monotonic() - started < 2
        for s in socks:
            s.settimeout(STALL_TIMEOUT_S + 20)
            assert s.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for s in socks:
            s.close()


def test_api_key_appears_in_no_ray_file(urls) -> None:
    """The key was read from a file: no Ray log, no session file, no Serve status carries it
    (runtime_env.env_vars would have put it in several)."""
    import ray
    from ray import serve

    assert httpx.get(f"{urls['eagle']}/v1/models",
                     headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert not (leaks := files_containing(session, API_KEY)), leaks
    assert API_KEY not in str(serve.status())
    assert API_KEY not in json.dumps(ray._private.state.actors(), default=str)
