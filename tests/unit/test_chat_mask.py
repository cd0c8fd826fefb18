"""Chat template + tokenize + assistant loss mask on the real target tokenizers (eyas.data.chat)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eyas.data.chat import (
    PINNED_DATE_STRING,
    ChatTemplateError,
    TokenizedConversation,
    count_prompt_tokens,
    generation_prompt_ids,
    load_tokenizer,
    tokenize_conversation,
)

PATHS = {
    "llama-3.1-instruct": "tokenizers/llama-3.1-instruct",
    "llama-4-scout-instruct": "tokenizers/llama-4-scout-instruct",
    "qwen2.5-instruct": "tokenizers/qwen2.5-instruct",
    "qwen3": "tokenizers/qwen3",
    "stories260k": "models/stories260k",
}
# Written down here, not read from the tokenizer, so a wrong eos in a config cannot hide a bug.
EOT = {"llama-3.1-instruct": "<|eot_id|>", "llama-4-scout-instruct": "<|eot|>",
       "qwen2.5-instruct": "<|im_end|>", "qwen3": "<|im_end|>", "stories260k": "</s>"}
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"
NAMES = list(PATHS)
REPLIES = ["Once upon a time, there was a cat.", "The cat liked to play with a red ball.",
           "Then the cat went home and slept."]
QUESTIONS = ["Tell me a story.", "What did the cat do?", "And after that?"]


def conversation(pairs: int, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in zip(QUESTIONS[:pairs], REPLIES[:pairs], strict=True):
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


@pytest.fixture(scope="module")
def get_tok(assets: Path) -> Callable[[str], Any]:
    """Load each tokenizer at most once per module (the big ones take seconds)."""
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = load_tokenizer(str(assets / PATHS[name]))
        return cache[name]

    return get


def fresh_stories(assets: Path, template: str | None = None) -> Any:
    """A private stories260k tokenizer (safe to give another chat template)."""
    tok = load_tokenizer(str(assets / PATHS["stories260k"]))
    if template is not None:
        tok.chat_template = template
    return tok


def mask_runs(mask: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of 1s."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def expected_masked_text(name: str, replies: list[str]) -> str:
    """Each reply followed by its end-of-turn token; stories260k puts ' ' before each reply,
    and its decoder drops the first leading space of what it decodes."""
    if name == "stories260k":
        return "".join(f" {r}{EOT[name]}" for r in replies)[1:]
    if name == "qwen3":  # thinking on (the template default): the target writes the last block
        replies = [*replies[:-1], QWEN3_EMPTY_THINK + replies[-1]]
    return "".join(f"{r}{EOT[name]}" for r in replies)


def non_assistant_token_indices(tok: Any, messages: list[dict[str, str]]) -> set[int]:
    """Tokens overlapping the text of system/user messages in the whole rendering."""
    text = tok.apply_chat_template(messages, tokenize=False)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    found, pos = set(), 0
    for msg in messages:
        at = text.find(msg["content"], pos)
        assert at >= 0, f"{msg['content']!r} not found in the rendering"
        pos = at + len(msg["content"])
        if msg["role"] != "assistant":
            found |= {i for i, (s, e) in enumerate(offsets) if s < pos and e > at}
    return found


def check_conversation(name: str, tok: Any, messages: list[dict[str, str]]) -> None:
    """Every property the data stage relies on, for one conversation."""
    out = tokenize_conversation(tok, messages, template_name=name)
    assert isinstance(out, TokenizedConversation)
    reference = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert out.input_ids == list(reference)
    assert len(out.loss_mask) == out.num_tokens and set(out.loss_mask) <= {0, 1}
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    masked = [t for t, m in zip(out.input_ids, out.loss_mask, strict=True) if m]
    assert tok.decode(masked) == expected_masked_text(name, replies)
    assert out.num_loss_tokens == len(masked)
    # BOS (or the first header) and all system/user text are unmasked.
    assert out.loss_mask[0] == 0
    assert all(out.loss_mask[i] == 0 for i in non_assistant_token_indices(tok, messages))
    # The only control token ever masked is the end-of-turn one (no headers, no BOS).
    eot_id = tok.convert_tokens_to_ids(EOT[name])
    controls = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert {t for t in masked if t in controls} == {eot_id}
    check_generation_prompts(name, tok, messages, out)


def check_generation_prompts(name: str, tok: Any, messages: list[dict[str, str]],
                             out: TokenizedConversation) -> None:
    """generation_prompt_ids(history) + the reply's masked tokens is a prefix of the full ids."""
    runs = mask_runs(out.loss_mask)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(runs) == len(turns), "one masked run per assistant turn"
    for k, (turn, (start, end)) in enumerate(zip(turns, runs, strict=True)):
        prompt = generation_prompt_ids(tok, messages[:turn], template_name=name)
        assert out.input_ids[:len(prompt)] == prompt
        assert out.input_ids[end - 1] == tok.convert_tokens_to_ids(EOT[name])
        # The mask starts where the serving prompt ends (Qwen3's thinking block included: in
        # thinking mode the target writes it).
        assert start == len(prompt), (k, tok.decode(out.input_ids[len(prompt):start]))


@pytest.mark.parametrize("name", NAMES)
def test_single_turn(get_tok, name):
    check_conversation(name, get_tok(name), conversation(1))


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn(get_tok, name):
    check_conversation(name, get_tok(name), conversation(3))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "stories260k"])
def test_with_system_prompt(get_tok, name):
    check_conversation(name, get_tok(name), conversation(2, system="You are a terse assistant."))


def test_stories_mask_equals_generation_tags(get_tok):
    """stories260k's template marks replies with {% generation %}: the derived mask must agree,
    including a reply whose template space becomes its own token ('123 ...')."""
    tok = get_tok("stories260k")
    convs = [conversation(1), conversation(3),
             [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "123 dogs!"},
              {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "(Because.)"}]]
    for msgs in convs:
        ref = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
        out = tokenize_conversation(tok, msgs, template_name="stories260k")
        assert out.input_ids == list(ref["input_ids"])
        assert out.loss_mask == list(ref["assistant_masks"])
        assert sum(ref["assistant_masks"]) > 0


def test_stories_system_role_is_named(get_tok):
    msgs = [{"role": "system", "content": "Be kind."}, *conversation(1)]
    with pytest.raises(ChatTemplateError, match=r"'stories-tpl'.*rejects the role 'system'"):
        tokenize_conversation(get_tok("stories260k"), msgs, template_name="stories-tpl")
    with pytest.raises(ChatTemplateError, match="'system'"):
        count_prompt_tokens(get_tok("stories260k"), msgs, template_name="stories-tpl")


def test_llama31_date_header_is_masked_and_pinned(get_tok):
    tok = get_tok("llama-3.1-instruct")
    msgs = conversation(2)
    out = tokenize_conversation(tok, msgs, template_name="llama-3.1")
    assert out == tokenize_conversation(tok, msgs, template_name="llama-3.1")  # deterministic
    header = tok.decode([t for t, m in zip(out.input_ids, out.loss_mask, strict=True) if not m])
    assert "Cutting Knowledge Date: December 2023" in header
    assert f"Today Date: {PINNED_DATE_STRING}" in header
    masked = tok.decode([t for t, m in zip(out.input_ids, out.loss_mask, strict=True) if m])
    assert "Date" not in masked and "system" not in masked


def test_qwen3_reasoning_kept_on_last_turn_only(get_tok):
    """A reply carrying its reasoning: the template keeps it on the last turn (masked, with the
    answer) and strips it from earlier turns (only their answer is masked)."""
    tok = get_tok("qwen3")
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4."}]
    out = tokenize_conversation(tok, msgs, template_name="qwen3")
    assert out.input_ids == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
    masked = tok.decode([t for t, m in zip(out.input_ids, out.loss_mask, strict=True) if m])
    assert masked == "Hello!<|im_end|><think>\nAdd them.\n</think>\n\n4.<|im_end|>"
    prompt = generation_prompt_ids(tok, msgs[:3], template_name="qwen3")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")  # template default: thinking
    on = tokenize_conversation(tok, msgs, template_name="qwen3", enable_thinking=True)
    assert on == out


def test_qwen3_mask_follows_the_serving_mode(get_tok):
    """Thinking on: the target writes <think>\n... itself, masked 1. Off: the empty block is in
    the generation prompt the target is given, masked 0."""
    tok = get_tok("qwen3")
    msgs = conversation(2)
    masked = {}
    for thinking in (True, False):
        out = tokenize_conversation(tok, msgs, template_name="qwen3", enable_thinking=thinking)
        ref = tok.apply_chat_template(msgs, tokenize=True, enable_thinking=thinking)["input_ids"]
        assert out.input_ids == list(ref)
        masked[thinking] = tok.decode([t for t, m in zip(out.input_ids, out.loss_mask, strict=True) if m])
        prompt = generation_prompt_ids(tok, msgs[:3], template_name="qwen3", enable_thinking=thinking)
        assert tok.decode(prompt).endswith(QWEN3_EMPTY_THINK if not thinking else "assistant\n")
        runs = mask_runs(out.loss_mask)
        assert runs[-1][0] == len(prompt)  # the mask starts right where the serving prompt ends
    assert masked[True] == f"{REPLIES[0]}<|im_end|>{QWEN3_EMPTY_THINK}{REPLIES[1]}<|im_end|>"
    assert masked[False] == f"{REPLIES[0]}<|im_end|>{REPLIES[1]}<|im_end|>"


REVERSED = ("{{ bos_token }}{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + "
            "eos_token }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
LAST_PAIR_ONLY = ("{{ bos_token }}{% for m in messages[-2:] %}{{ m['role'] + ': ' + m['content'] "
                  "+ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}"
                  "{% endif %}")
NO_END_OF_TURN = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")


@pytest.mark.parametrize(("template", "why"), [
    (REVERSED, "not a prefix"), (LAST_PAIR_ONLY, "not a prefix"),
    (NO_END_OF_TURN, "no end-of-turn control token")])
def test_unalignable_template_raises_naming_it(assets, template, why):
    tok = fresh_stories(assets, template)
    with pytest.raises(ChatTemplateError, match=rf"'fake-template', message \d+: .*{why}"):
        tokenize_conversation(tok, conversation(3), template_name="fake-template")


def test_reply_merging_with_prompt_raises(get_tok):
    """'\\n' + 'Hello' after Qwen's 'assistant\\n' tokenizes as one '\\n\\n': no clean boundary."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]
    with pytest.raises(ChatTemplateError, match=r"'qwen2.5', message 1: .*merge"):
        tokenize_conversation(get_tok("qwen2.5-instruct"), msgs, template_name="qwen2.5")


@pytest.mark.parametrize(("messages", "why"), [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "role 'user' where"),
    ([{"role": "user", "content": "a"}], "must end with a assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "empty"),
    ([{"role": "user", "content": "a </s> b"}, {"role": "assistant", "content": "c"}], "'</s>'"),
    ([{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "c"}],
     "exactly the keys"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "c"}], "not str"),
    ([], "no messages"),
])
def test_bad_messages_raise(get_tok, messages, why):
    with pytest.raises(ChatTemplateError, match=rf"'tpl'.*{why}"):
        tokenize_conversation(get_tok("stories260k"), messages, template_name="tpl")


@pytest.mark.parametrize("name", ["llama-3.1-instruct", "qwen3"])
def test_prompt_token_counts(get_tok, name):
    tok = get_tok(name)
    full = conversation(3)
    assert count_prompt_tokens(tok, full) == tokenize_conversation(tok, full).num_tokens
    history = full[:-1]
    assert count_prompt_tokens(tok, history) == len(generation_prompt_ids(tok, history))
    with pytest.raises(ChatTemplateError, match="must end with a user turn"):
        generation_prompt_ids(tok, full)


def test_load_tokenizer_errors(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="empty"):
        load_tokenizer(str(empty))
    plain = tmp_path / "no-template"
    src = assets / PATHS["stories260k"]
    shutil.copytree(src, plain, ignore=shutil.ignore_patterns("*.safetensors"))
    (plain / "tokenizer_config.json").chmod(0o644)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match="no-template.*has no chat template"):
        load_tokenizer(str(plain))
