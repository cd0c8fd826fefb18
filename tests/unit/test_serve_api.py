"""OpenAI request models, error bodies, the SSE format, incremental detokenization with stop
strings, and the per-replica statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eyas.serve.api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Usage,
    parse_request,
    sse,
    stream_chunk,
    usage_chunk,
)
from eyas.serve.backends.base import SpecStats
from eyas.serve.detokenize import IncrementalDetokenizer
from eyas.serve.stats import ServeStats

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse_chat(**kw) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, json.dumps(CHAT | kw).encode(), 1 << 20)


def api_error(model: type, body: dict | bytes) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as info:
        parse_request(model, raw, 1 << 20)
    return info.value


# ----------------------------------------------------------------------------- requests


def test_chat_request_defaults_and_sampling_params() -> None:
    req = parse_chat(max_tokens=9, temperature=0, stop="\n", seed=5, top_k=-1, ignore_eos=True)
    assert req.template_messages() == [{"role": "user", "content": "hi"}]
    p = req.sampling_params(req.requested_max_tokens())
    assert (p.max_tokens, p.temperature, p.stop, p.seed, p.top_k, p.ignore_eos) == (
        9, 0.0, ["\n"], 5, 0, True)
    assert parse_chat().temperature == 1.0 and not parse_chat().stream  # OpenAI defaults
    assert parse_chat(max_completion_tokens=4).requested_max_tokens() == 4


def test_content_parts_and_developer_role() -> None:
    req = parse_chat(messages=[{"role": "developer", "content": "be brief"},
                               {"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "text", "text": "b"}]}])
    assert req.template_messages() == [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "ab"}]


@pytest.mark.parametrize(("body", "param"), [
    (CHAT | {"n": 2}, "n"),
    (CHAT | {"max_tokens": "5"}, "max_tokens"),  # no coercion of strings
    (CHAT | {"max_tokens": 0}, "max_tokens"),
    (CHAT | {"temperature": 3}, "temperature"),
    (CHAT | {"top_p": 0}, "top_p"),
    (CHAT | {"stream": "yes"}, "stream"),
    (CHAT | {"frequency_penalty": 0.5}, "frequency_penalty"),
    (CHAT | {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (CHAT | {"stop": [""]}, "stop"),
    (CHAT | {"tools": []}, "tools"),  # unknown fields are errors, not ignored
    (CHAT | {"logprobs": True}, None),
    (CHAT | {"stream_options": {"include_usage": True}}, None),  # needs stream
    (CHAT | {"messages": []}, "messages"),
    (CHAT | {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    (CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    ({"messages": CHAT["messages"]}, "model"),
])
def test_bad_chat_requests(body, param) -> None:
    err = api_error(ChatCompletionRequest, body)
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param == param or (param and err.param.startswith(param)), err.param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_completion_prompts_and_unsupported_options() -> None:
    def prompt(p):
        return parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": p}).encode(),
                             1 << 20).single_prompt()

    assert prompt("abc") == "abc" and prompt([1, 2]) == [1, 2]
    assert prompt(["abc"]) == "abc" and prompt([[1, 2]]) == [1, 2]
    assert api_error(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}).param == "prompt"
    for extra in ({"echo": True}, {"best_of": 2}, {"suffix": "x"}, {"logprobs": 1}):
        assert "not supported" in api_error(CompletionRequest,
                                            {"model": "m", "prompt": "a", **extra}).message


def test_malformed_and_oversized_bodies() -> None:
    assert api_error(ChatCompletionRequest, b'{"model": ').code == "invalid_json"
    assert api_error(ChatCompletionRequest, b"[1, 2]").code == "invalid_json"
    assert api_error(ChatCompletionRequest, b"\xff\xfe").code == "invalid_json"
    with pytest.raises(APIError) as info:
        parse_request(ChatCompletionRequest, b" " * 2048, 1024)
    assert info.value.status == 413


# ----------------------------------------------------------------------------- SSE format


def test_stream_chunks_and_usage_extension() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=8, total_tokens=11, spec_verify_ct=2)
    first = stream_chunk("id1", "m", True, 7, text="", role=True, include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["usage"] is None and first["object"] == "chat.completion.chunk"
    fin = stream_chunk("id1", "m", False, 7, finish_reason="stop")
    assert fin["choices"][0] == {"index": 0, "text": "", "logprobs": None,
                                 "finish_reason": "stop"} and "usage" not in fin
    last = usage_chunk("id1", "m", True, 7, usage)
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 3,
                                                       "completion_tokens": 8,
                                                       "total_tokens": 11,
                                                       "spec_verify_ct": 2}
    assert sse({"a": 1}) == b'data: {"a":1}\n\n' and sse("[DONE]") == b"data: [DONE]\n\n"


# ----------------------------------------------------------------------------- detokenizer


@pytest.fixture(scope="module")
def tokenizer(stories260k: Path):
    from eyas.data.chat import load_tokenizer

    return load_tokenizer(str(stories260k))


def test_incremental_text_equals_full_decode(tokenizer) -> None:
    text = "Once upon a time, Lily saw a cat. \"Héllo\" 日本 done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([t]) for t in ids] + [detok.finish()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)  # split characters wait for their bytes


def test_stop_string_is_never_released(tokenizer) -> None:
    ids = tokenizer("a big dog and a cat", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stops=["dog and"])
    released = ""
    for t in ids:  # the engine ends the request at the token completing the stop string
        released += detok.add([t])
        if "dog and" in detok.text:
            break
    assert released == "a big "  # " dog" was held back: it could have started the stop
    assert released + detok.finish("dog and") == "a big "


def test_hold_back_releases_when_the_stop_does_not_complete(tokenizer) -> None:
    ids = tokenizer("a dot", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, stops=["do it"])
    out = "".join(detok.add([t]) for t in ids)
    assert not out.endswith("do")  # " do" may still become "do it"
    assert out + detok.finish() == "a dot"


# ----------------------------------------------------------------------------- statistics


def test_stats_acceptance_tokens_per_second_and_load() -> None:
    stats = ServeStats("m", window_s=10.0)
    stats.start("a")
    stats.start("b")
    assert (len(stats.queued), len(stats.running)) == (2, 0)
    stats.first_token("a", 0.05)
    stats.tokens(30, now=100.0)
    stats.tokens(20, now=105.0)
    assert stats.tokens_per_second(now=106.0) == 5.0
    assert stats.tokens_per_second(now=112.0) == 2.0  # the first batch left the window
    stats.finish("a", "length", 1.0, SpecStats(verify_steps=10, accepted_tokens=20,
                                               decoded_tokens=30))
    stats.finish("b", "abort", 1.0, None)
    snap = stats.snapshot()
    assert snap["acceptance_length"] == 3.0 == snap["avg_spec_accept_length"]
    assert snap["finished_requests"] == {"length": 1, "abort": 1}
    assert (snap["running_requests"], snap["queued_requests"]) == (0, 0)


def test_stats_feed_ray_metrics(monkeypatch) -> None:
    from eyas.serve import stats as stats_module

    calls: list[tuple[str, str, float]] = []

    class Recorder:
        @staticmethod
        def inc(name, value=1.0, description="", **tags):
            calls.append(("counter", name, value))

        @staticmethod
        def set_gauge(name, value, description="", **tags):
            calls.append(("gauge", name, value))

        @staticmethod
        def observe(name, value, boundaries, description="", **tags):
            calls.append(("histogram", name, value))

    monkeypatch.setattr(stats_module, "metrics", Recorder)
    stats = ServeStats("m")
    stats.start("a")
    stats.first_token("a", 0.2)
    stats.tokens(5)
    stats.finish("a", "stop", 0.5, SpecStats(verify_steps=2, accepted_tokens=3,
                                             decoded_tokens=5))
    names = {(kind, name) for kind, name, _ in calls}
    assert {("histogram", "eyas_serve_ttft_seconds"),
            ("counter", "eyas_serve_output_tokens_total"),
            ("gauge", "eyas_serve_output_tokens_per_second"),
            ("gauge", "eyas_serve_acceptance_length"),
            ("gauge", "eyas_serve_running_requests"),
            ("gauge", "eyas_serve_queued_requests"),
            ("counter", "eyas_serve_requests_total"),
            ("histogram", "eyas_serve_e2e_latency_seconds")} <= names
    assert ("gauge", "eyas_serve_acceptance_length", 2.5) in calls


def test_round_shares_and_times_feed_ray_metrics(monkeypatch) -> None:
    from eyas.serve import stats as stats_module

    calls: list[tuple[str, float, dict]] = []

    class Recorder:
        @staticmethod
        def set_gauge(name, value, description="", **tags):
            calls.append((name, value, tags))

    monkeypatch.setattr(stats_module, "metrics", Recorder)
    rounds = {"plain": {"share": 0.25, "predicted_ms": None, "measured_ms": 2.0},
              "chain 3/1/4": {"share": 0.75, "predicted_ms": 5.0, "measured_ms": 4.0}}
    ServeStats("m", rounds=lambda: rounds).publish(force=True)
    got = {(name, tags.get("setting")): value for name, value, tags in calls}
    assert got[("eyas_serve_speculation_round_share", "chain 3/1/4")] == 0.75
    assert got[("eyas_serve_speculation_round_share", "plain")] == 0.25
    assert got[("eyas_serve_round_time_predicted_seconds", "chain 3/1/4")] == pytest.approx(5e-3)
    assert got[("eyas_serve_round_time_measured_seconds", "plain")] == pytest.approx(2e-3)
    assert ("eyas_serve_round_time_predicted_seconds", "plain") not in got  # fixed: none
    assert all(tags["model"] == "m" for _, _, tags in calls)
    calls.clear()
    ServeStats("m", rounds=lambda: None).publish(force=True)  # SGLang: no round gauges
    assert not [c for c in calls if "round" in c[0]]
