"""The token-counted load-test workloads (``random``, ``sharegpt``) with real tokenizers from
../shared/assets, their config errors, and the request bodies they produce: no Ray, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eyas.config import ConfigError, validate_config
from eyas.loadtest import runner, token_workloads
from eyas.loadtest.config import LoadTestConfig, WorkloadConfig
from eyas.loadtest.workloads import Prompt, load_prompts

SHAREGPT_ASSET = "assets:datasets/sft/fastchat_dummy_conversation.json"


def prompt_text(p: Prompt) -> str:
    return p.text if p.text is not None else p.messages[-1]["content"]


def random_cfg(tokenizer: str, **kw) -> WorkloadConfig:
    base = {"kind": "random", "input_len": 64, "output_len": 32, "range_ratio": 0.5,
            "num_prompts": 12, "chat": False, "tokenizer": tokenizer}
    return WorkloadConfig(**(base | kw))


@pytest.fixture(scope="module")
def stories_tok(stories260k: Path):
    return AutoTokenizer.from_pretrained(stories260k)


# --- random ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["stories260k", "smollm2"])
def test_random_lengths_are_tokens_within_the_range(name: str, request) -> None:
    path = str(request.getfixturevalue(name))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = load_prompts(random_cfg(path), seed=3)
    in_lens = [len(tok(p.text)["input_ids"]) for p in prompts]
    out_lens = [p.output_len for p in prompts]
    assert len(prompts) == 12
    assert all(32 <= n <= 64 for n in in_lens) and len(set(in_lens)) > 1, in_lens
    assert all(16 <= n <= 32 for n in out_lens) and len(set(out_lens)) > 1, out_lens


def test_random_range_ratio_one_fixes_every_length(stories260k: Path, stories_tok) -> None:
    prompts = load_prompts(random_cfg(str(stories260k), range_ratio=1.0, chat=True), seed=0)
    assert {len(stories_tok(prompt_text(p))["input_ids"]) for p in prompts} == {64}
    assert {p.output_len for p in prompts} == {32}
    assert all(p.messages and p.messages[0]["role"] == "user" for p in prompts)


def test_random_is_seeded(stories260k: Path) -> None:
    cfg = random_cfg(str(stories260k), num_prompts=4)
    a, b = load_prompts(cfg, seed=7), load_prompts(cfg, seed=7)
    assert a == b and a != load_prompts(cfg, seed=8)


def test_random_output_len_defaults_to_max_tokens(stories260k: Path) -> None:
    cfg = WorkloadConfig(kind="random", input_len=8, range_ratio=1.0, num_prompts=2,
                         tokenizer=str(stories260k))
    assert [p.output_len for p in load_prompts(cfg, seed=0, max_tokens=40)] == [40, 40]


def test_random_tokenizer_defaults_to_the_endpoint_model(smollm2: Path) -> None:
    cfg = WorkloadConfig(kind="random", input_len=16, range_ratio=1.0, num_prompts=2, chat=False)
    prompts = load_prompts(cfg, seed=0, model="smollm2-135m-instruct")  # a registered target
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert [len(tok(p.text)["input_ids"]) for p in prompts] == [16, 16]
    with pytest.raises(ConfigError, match="loadtest.workload.tokenizer"):
        load_prompts(cfg, seed=0, model="served-name-only")


def test_random_input_len_must_leave_room_for_text(stories260k: Path) -> None:
    with pytest.raises(ConfigError, match=r"workload.input_len=1 .*adds 1 special"):
        load_prompts(random_cfg(str(stories260k), input_len=1), seed=0)


def test_a_missing_tokenizer_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="loadtest.workload.tokenizer"):
        load_prompts(random_cfg(str(tmp_path / "nothing-here")), seed=0)


# --- sharegpt ----------------------------------------------------------------------------------

def turn(who: str, value: str) -> dict[str, str]:
    return {"from": who, "value": value}


def test_first_exchange_takes_the_first_human_turn_and_its_reply() -> None:
    first = token_workloads.first_exchange
    assert first({"conversations": [turn("human", "q"), turn("gpt", "a"),
                                    turn("human", "q2"), turn("gpt", "a2")]}, "r") == ("q", "a")
    assert first({"conversations": [turn("system", "s"), turn("human", "q"),
                                    turn("gpt", "a")]}, "r") == ("q", "a")
    assert first({"conversation": [turn("gpt", "hi"), turn("human", "q"),
                                   turn("gpt", "a")]}, "r") == ("q", "a")
    assert first({"conversations": [turn("human", "q")]}, "r") is None
    assert first({"conversations": [turn("human", "q"), turn("human", "q2")]}, "r") is None
    assert first({"conversations": []}, "r") is None
    with pytest.raises(ConfigError, match="f.json row 3: not a ShareGPT row"):
        first({"messages": []}, "f.json row 3")


def test_sharegpt_output_len_is_the_reply_in_tokens(tmp_path: Path, stories260k: Path,
                                                    stories_tok) -> None:
    rows = [{"conversations": [turn("human", f"Tell me a story about a cat number {i}."),
                               turn("gpt", "Once upon a time " + "there was a cat. " * i)]}
            for i in range(1, 9)]
    rows.append({"conversations": [turn("human", "a lone question")]})  # skipped
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    cfg = WorkloadConfig(kind="sharegpt", path=str(path), tokenizer=str(stories260k), chat=False)
    prompts = load_prompts(cfg, seed=1)
    replies = {r["conversations"][0]["value"]: r["conversations"][1]["value"] for r in rows[:-1]}
    assert len(prompts) == 8
    for p in prompts:
        assert p.output_len == len(stories_tok(replies[p.text], add_special_tokens=False)["input_ids"])
    assert prompts == load_prompts(cfg, seed=1) and prompts != load_prompts(cfg, seed=2)

    fixed = load_prompts(cfg.model_copy(update={"output_len": 5}), seed=1)
    assert [p.output_len for p in fixed] == [5] * 8
    short = load_prompts(cfg.model_copy(update={"context_len": 40}), seed=1)
    assert 0 < len(short) < 8
    assert all(len(stories_tok(p.text)["input_ids"]) + p.output_len <= 40 for p in short)
    with pytest.raises(ConfigError, match="workload.context_len=4"):
        load_prompts(cfg.model_copy(update={"context_len": 4}), seed=1)


def test_sharegpt_asset_gives_chat_prompts(assets: Path, stories260k: Path) -> None:
    cfg = WorkloadConfig(kind="sharegpt", path=SHAREGPT_ASSET, tokenizer=str(stories260k),
                         num_prompts=16)
    prompts = load_prompts(cfg, seed=0)
    assert len(prompts) == 16 and len({prompt_text(p) for p in prompts}) > 1
    assert all(p.messages and p.output_len >= 2 for p in prompts)


# --- config and request bodies -----------------------------------------------------------------

@pytest.mark.parametrize(("workload", "key"), [
    ({"kind": "random", "range_ratio": 1.5}, "workload.range_ratio"),
    ({"kind": "sharegpt"}, "workload.path"),
    ({"kind": "synthetic", "tokenizer": "t"}, "workload.tokenizer"),
    ({"kind": "random", "context_len": 64}, "workload.context_len"),
    ({"kind": "prompts_file", "path": "p.jsonl", "range_ratio": 0.5}, "workload.range_ratio"),
    ({"kind": "sharegpt", "path": "p.json", "context_len": 1}, "workload.context_len"),
    ({"kind": "random", "input_len": 0}, "workload.input_len"),
])
def test_bad_workload_values_name_their_key(workload: dict, key: str) -> None:
    ep = [{"name": "a", "url": "http://x", "model": "m"}]
    with pytest.raises(ConfigError, match=key):
        validate_config(LoadTestConfig, {"endpoints": ep, "output": "o", "workload": workload})


def test_a_dumped_workload_validates_again() -> None:
    cfg = WorkloadConfig(kind="random", input_len=32, range_ratio=1.0, tokenizer="t")
    assert WorkloadConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_fixed_output_lengths_are_sent_with_ignore_eos() -> None:
    cfg = LoadTestConfig(endpoints=[{"name": "a", "url": "http://x", "model": "m"}], output="o",
                         max_tokens=9)
    fixed, free = runner.request_bodies(cfg, cfg.endpoints[0],
                                        [Prompt(text="x", output_len=3), Prompt(text="y")])
    assert fixed["max_tokens"] == 3 and fixed["ignore_eos"] is True
    assert free["max_tokens"] == 9 and "ignore_eos" not in free
