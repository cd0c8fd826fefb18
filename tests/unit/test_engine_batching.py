"""Continuous batching: batched outputs equal solo outputs; joining, aborting, stopping. The
speculative cases run in both speculation modes (the configured tree every round, and the
adaptive choice per round)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from eyas.engine.engine import Engine, SamplingParams, SpecConfig

PROMPTS = [[1, 403, 407, 261, 378], [1, 22, 33], [1, 403, 407, 261, 378, 10, 300, 42, 99, 7],
           [1]]
TREE = SpecConfig(num_steps=5, eagle_topk=4, num_draft_tokens=8)


@pytest.fixture(params=["fixed", "adaptive"])
def spec(request) -> SpecConfig:
    return dataclasses.replace(TREE, mode=request.param)


def random_draft(stories260k: Path):
    from eyas.draft.model import DraftConfig, Eagle3Draft

    torch.manual_seed(0)
    cfg = json.loads((stories260k / "config.json").read_text())
    return Eagle3Draft(DraftConfig.from_target_config(cfg, 512, aux_layer_ids=[0, 2, 3]))


@pytest.fixture(scope="module")
def solo(stories260k: Path) -> list[list[int]]:
    """Each prompt decoded alone, greedily (plain decoding)."""
    engine = Engine(str(stories260k))
    return [engine.generate([p], SamplingParams(max_tokens=32))[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize("mode", [None, "fixed", "adaptive"])  # None: no speculation
def test_batch_equals_each_alone(stories260k, solo, mode):
    draft = random_draft(stories260k) if mode else None
    spec = dataclasses.replace(TREE, mode=mode) if mode else None
    engine = Engine(str(stories260k), spec=spec, draft=draft)
    params = [SamplingParams(max_tokens=n) for n in (32, 20, 32, 7)]  # leave at different times
    outs = engine.generate(PROMPTS, params)
    for want, got, p in zip(solo, outs, params, strict=True):
        assert got.token_ids == want[: p.max_tokens]
        assert got.finish_reason == "length" and got.completion_tokens == p.max_tokens


def test_requests_join_mid_flight_and_queue(stories260k, solo, spec):
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k),
                    max_batch_size=2)
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=32))
    tokens: dict[str, list[int]] = {}
    for _ in range(3):
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    for rid, prompt in zip("bcd", PROMPTS[1:], strict=True):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=32))
    assert engine.num_free_slots == 1  # "a" holds a slot; b, c, d wait for the next step
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [tokens[r] for r in "abcd"] == solo
    assert engine.num_free_slots == 2


def test_abort_frees_the_slot(stories260k, spec):
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k),
                    max_batch_size=2)
    engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=100))
    engine.add_request("y", PROMPTS[1], SamplingParams(max_tokens=100))
    engine.add_request("z", PROMPTS[2], SamplingParams(max_tokens=3))
    engine.step()
    assert engine.num_free_slots == 0
    assert engine.abort("x") and engine.abort("z")  # one running, one still waiting
    assert engine.num_free_slots == 1
    outs = {o.request_id: o for o in engine.step()}
    assert outs["x"].finished and outs["x"].finish_reason == "abort"
    assert outs["z"].finish_reason == "abort" and outs["z"].completion_tokens == 0
    assert not outs["y"].finished
    assert not engine.abort("x")
    engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=2))  # the id is reusable
    with pytest.raises(RuntimeError, match="idle"):
        engine.generate([PROMPTS[3]], SamplingParams(max_tokens=2))
    while engine.has_unfinished():
        engine.step()
    assert engine.num_free_slots == 2


def test_stop_token_ids_and_eos(stories260k, solo, spec):
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k))
    target = solo[0][5]
    cut = solo[0].index(target) + 1
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=32, stop_token_ids=[target]))[0]
    assert out.token_ids == solo[0][:cut]
    assert out.finish_reason == "stop" and out.stop_reason == target
    engine.eos_ids = [target]  # as if the model's eos were this token
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=32))[0]
    assert out.token_ids == solo[0][:cut]
    free = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=32, ignore_eos=True))[0]
    assert free.token_ids == solo[0] and free.finish_reason == "length"


def test_stop_strings(stories260k, solo, spec):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories260k))
    text = tok.decode(solo[0], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k))
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=32, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == solo[0][: len(out.token_ids)]
    assert stop in tok.decode(out.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(out.token_ids[:-1], skip_special_tokens=True)


def test_max_seq_len_finishes_with_length(stories260k, solo, spec):
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k), max_seq_len=20)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=100))[0]
    assert out.finish_reason == "length" and out.prompt_tokens + out.completion_tokens == 20
    assert out.token_ids == solo[0][:15]
    with pytest.raises(ValueError, match="max_seq_len=20"):
        engine.add_request("long", list(range(1, 30)), SamplingParams())


def test_invalid_requests_are_rejected(stories260k):
    engine = Engine(str(stories260k))
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request("a", [1], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], SamplingParams())
    engine.add_request("a", [1], SamplingParams())
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("a", [1], SamplingParams())


def test_stop_string_check_decodes_a_bounded_tail(stories260k):
    """The stop-string check equals the whole-output rule on real text, and the text it decodes
    per step does not grow with the output (it was the whole output: quadratic)."""
    from transformers import AutoTokenizer

    from eyas.engine.sampling import SamplingParams, truncate_at_stop

    tok = AutoTokenizer.from_pretrained(str(stories260k))
    story = ("Once upon a time, there was a little girl named Lily. She liked to play. "
             "One day she saw a big red ball in the park and she ran to it. ")
    ids = tok(story * 3).input_ids[1:]  # ~130 tokens: longer than the tail bound below
    decoded: list[int] = []

    def decode(x):
        decoded.append(len(x))
        return tok.decode(x, skip_special_tokens=True)

    for stop in ["big red", "Lily.", "park and", "she ran", "never there"]:
        params = SamplingParams(max_tokens=1000, stop=[stop])
        full_text = tok.decode(ids, skip_special_tokens=True)
        got = None
        for j in range(len(ids)):
            kept, reason, _ = truncate_at_stop(ids[:j], ids[j:j + 1], params, [], decode)
            if reason == "stop":
                got = j
                break
        if stop not in full_text:
            assert got is None
            continue
        # reference: the first j whose decoded prefix contains the stop string
        want = next(j for j in range(len(ids)) if stop in tok.decode(ids[: j + 1], skip_special_tokens=True))
        assert got == want
    assert len(ids) > 100 and max(decoded) <= 4 * len("never there") + 8 + 1
