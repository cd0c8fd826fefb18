"""Regeneration: the multi-turn walk, the transformers backend on stories260k, SGLang mapping."""

from __future__ import annotations

import pytest

from eyas.data.config import GenerationConfig
from eyas.data.regenerate import (
    Generation,
    HFBackend,
    finish_generation,
    regenerate,
    sglang_engine_kwargs,
    sglang_generation,
    sglang_sampling_params,
)


class EchoBackend:
    """Replies with the number of messages it was shown: proves history order per turn."""

    def __init__(self):
        self.calls: list[list[list[int]]] = []

    def generate(self, prompts):
        self.calls.append(prompts)
        return [Generation(text=f"reply@{p[0]}", num_tokens=2, finish_reason="stop") for p in prompts]


def test_multi_turn_regenerates_on_top_of_regenerated_history():
    convs = [[{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
              {"role": "user", "content": "b"}, {"role": "assistant", "content": None}],
             [{"role": "user", "content": "c"}, {"role": "assistant", "content": None}]]
    seen = []

    def prompt_ids(history, tools):
        assert tools is None
        seen.append([m["content"] for m in history])
        return [len(history)]

    backend = EchoBackend()
    out = regenerate(convs, backend, prompt_ids)
    assert [len(c) for c in backend.calls] == [2, 1]  # round 1 batches both, round 2 only the first
    assert seen == [["a"], ["c"], ["a", "reply@1", "b"]]  # turn 2 sees the regenerated turn 1
    assert [m["content"] for m in out[0].messages] == ["a", "reply@1", "b", "reply@3"]
    assert out[0].finish_reasons == ["stop", "stop"] and out[0].generated_tokens == 4
    assert convs[0][1]["content"] is None  # inputs are not mutated


def test_hf_backend_greedy_on_stories260k(stories260k):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories260k))
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0)
    backend = HFBackend(str(stories260k), tok, cfg)
    prompts = [tok("Once upon a time").input_ids, tok("The cat").input_ids]
    gens = backend.generate(prompts)
    assert gens[0].text.startswith(", there was a little girl named Lily")  # README's known continuation
    alone = backend.generate([prompts[1]])[0]
    assert alone.text == gens[1].text  # left padding does not change a greedy reply
    assert all(g.finish_reason == "length" and g.num_tokens == 12 for g in gens)


def test_generation_is_cut_at_the_first_eos(stories260k):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories260k))
    ids = tok("Once upon a time", add_special_tokens=False).input_ids
    gen = finish_generation([*ids, 2, *ids], eos=[2], tokenizer=tok)
    assert gen == Generation("Once upon a time", len(ids) + 1, "stop")
    assert finish_generation(ids, eos=[2], tokenizer=tok).finish_reason == "length"


def test_sglang_mapping():
    cfg = GenerationConfig(engine="sglang", max_new_tokens=64, temperature=0.7, top_p=0.9, tp_size=4,
                           dtype="bfloat16", mem_fraction_static=0.8, seed=3)
    assert sglang_engine_kwargs("/m", cfg) == {"model_path": "/m", "tp_size": 4, "random_seed": 3,
                                               "dtype": "bfloat16", "log_level": "warning",
                                               "mem_fraction_static": 0.8}
    assert sglang_sampling_params(cfg) == {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9}
    out = {"text": "hi", "meta_info": {"finish_reason": {"type": "length", "length": 64}, "completion_tokens": 64}}
    assert sglang_generation(out) == Generation("hi", 64, "length")
    out = {"text": "hi", "meta_info": {"finish_reason": {"type": "stop", "matched": 2}, "completion_tokens": 3}}
    assert sglang_generation(out).finish_reason == "stop"


@pytest.mark.gpu
def test_sglang_backend_generates_on_gpu(stories260k):
    pytest.importorskip("sglang", reason="sglang is an optional extra for GPU nodes")
    from transformers import AutoTokenizer

    from eyas.data.regenerate import SGLangBackend

    tok = AutoTokenizer.from_pretrained(str(stories260k))
    backend = SGLangBackend(str(stories260k), tok, GenerationConfig(engine="sglang", max_new_tokens=8))
    gens = backend.generate([tok("Once upon a time").input_ids])
    assert gens[0].num_tokens > 0


def test_hf_backend_never_runs_past_the_context(stories260k):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories260k))
    backend = HFBackend(str(stories260k), tok, GenerationConfig(max_new_tokens=50))
    near_full = [1] + [300] * 505  # 506 of 512 positions used
    full = [1] + [300] * 520
    gens = backend.generate([near_full, full, tok("Once").input_ids])
    assert gens[0].num_tokens <= 6 and gens[0].finish_reason in ("length", "stop")
    assert gens[1] == Generation("", 0, "length")
    assert gens[2].num_tokens == 50  # a long neighbour does not cut a short prompt's reply


def test_reply_cache_resumes_and_keys_on_settings(tmp_path):
    """A second run over the same cache regenerates nothing; other settings or another
    conversation miss the cache; results come back in input order."""
    from eyas.data.regenerate import ReplyCache, regenerate_cached

    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": None}] for q in "abc"]
    uri = str(tmp_path / "cache")
    cfg = GenerationConfig(engine="hf")
    first = EchoBackend()
    out, cached = regenerate_cached(convs[:2], first, lambda h, t: [len(h)], ReplyCache(uri, "t", cfg))
    assert cached == [False, False] and len(first.calls) == 1
    again = EchoBackend()
    out2, cached2 = regenerate_cached(convs, again, lambda h, t: [len(h)], ReplyCache(uri, "t", cfg))
    assert cached2 == [True, True, False] and again.calls == [[[1]]]  # only "c" generated
    assert [r.messages for r in out2[:2]] == [r.messages for r in out]
    placement = cfg.model_copy(update={"batch_size": 64, "num_actors": 3})
    assert ReplyCache(uri, "t", placement).get(convs[0]) is not None  # batching is not in the key
    assert ReplyCache(uri, "t", cfg.model_copy(update={"temperature": 0.7})).get(convs[0]) is None
    assert ReplyCache(uri, "other-target", cfg).get(convs[0]) is None
    assert ReplyCache(None, "t", cfg).get(convs[0]) is None
