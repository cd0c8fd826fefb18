"""Tool use in the data stage: glaive function_call/observation turns become OpenAI-style tool
calls and results, rendered with the target's own template; the call is trained, the result is
not; templates without tool support quarantine such conversations (no Ray here)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_chat_mask import mask_runs

from eyas.data.chat import (
    PINNED_DATE_STRING,
    ChatTemplateError,
    TemplateWithoutToolsError,
    count_prompt_tokens,
    generation_prompt_ids,
    load_tokenizer,
    tokenize_conversation,
)
from eyas.data.config import DataConfig, GenerationConfig
from eyas.data.normalize import normalize_record
from eyas.data.regenerate import Generation, regenerate
from eyas.data.stages import PiiScrubber, Templater, Validator, to_rows, to_table
from eyas.data.tools import merge_pii_texts, pii_texts
from eyas.data.validate import validate_messages

GLAIVE = "datasets/sft/llamafactory_glaive_toolcall_en_demo.json"
# The four real target tokenizers; all four templates take tools.
PATHS = {"llama-3.1-instruct": "tokenizers/llama-3.1-instruct",
         "llama-4-scout-instruct": "tokenizers/llama-4-scout-instruct",
         "qwen2.5-instruct": "tokenizers/qwen2.5-instruct", "qwen3": "tokenizers/qwen3"}
EOT = {"llama-3.1-instruct": "<|eot_id|>", "llama-4-scout-instruct": "<|eot|>",
       "qwen2.5-instruct": "<|im_end|>", "qwen3": "<|im_end|>"}
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
QUESTIONS = ["What is the weather in Paris?", "And in Oslo?"]
ARGS = [{"city": "Paris"}, {"city": "Oslo"}]
RESULTS = ['{"temp_c": 21, "sky": "sunny"}', '{"temp_c": -3, "sky": "snow"}']
REPLIES = ["It is 21 degrees and sunny in Paris.", "Oslo has snow at minus 3 degrees."]
# A plain ChatML template: renders every role, but neither tools nor tool calls.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def bot(text: str | None) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def call(args: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": args}}]}


def result(text: str) -> dict[str, Any]:
    return {"role": "tool", "content": text}


def conversation() -> list[dict[str, Any]]:
    """Two rounds of question -> tool call -> tool result -> reply."""
    msgs: list[dict[str, Any]] = []
    for q, args, res, reply in zip(QUESTIONS, ARGS, RESULTS, REPLIES, strict=True):
        msgs += [user(q), call(args), result(res), bot(reply)]
    return msgs


def call_text(name: str, args: dict[str, Any]) -> str:
    """The tool call as each template writes it (written down here, not read from it)."""
    body = f'{{"name": "get_weather", "{{key}}": {json.dumps(args)}}}'
    if name.startswith("qwen"):
        return "<tool_call>\n" + body.replace("{key}", "arguments") + "\n</tool_call>"
    python = "<|python_start|><|python_end|>" if name == "llama-4-scout-instruct" else ""
    return python + body.replace("{key}", "parameters")


def covering(tok: Any, text: str, needle: str, after: int = 0) -> set[int]:
    """Indices of the tokens of ``text`` that overlap the first ``needle`` at or after ``after``."""
    at = text.index(needle, after)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return {i for i, (s, e) in enumerate(offsets) if s < at + len(needle) and e > at}


@pytest.fixture(scope="module")
def get_tok(assets: Path) -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = load_tokenizer(str(assets / PATHS.get(name, name)))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def glaive_rows(assets: Path) -> list[dict[str, Any]]:
    records = json.loads((assets / GLAIVE).read_text())
    return [normalize_record(r, "glaive", i) for i, r in enumerate(records)]


# ----------------------------------------------------------------------------- normalize / validate


def test_glaive_tool_turns_become_openai_tool_calls(glaive_rows):
    assert len(glaive_rows) == 300 and {r["status"] for r in glaive_rows} == {"ok"}
    convs = [json.loads(r["messages_json"]) for r in glaive_rows]
    assert sum(any(m.get("tool_calls") for m in c) for c in convs) == 153
    assert sum(bool(r["tools_json"]) for r in glaive_rows) == 191  # 109 declare "[]": none
    first = convs[0]
    assert first[3] == {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}]}
    assert first[4]["role"] == "tool" and first[4]["content"].startswith('{"recipes"')
    tools = json.loads(glaive_rows[0]["tools_json"])
    assert tools[0]["type"] == "function" and tools[0]["function"]["name"] == "search_recipes"
    for conv in convs:
        assert validate_messages(conv, regenerate=False) == conv


def test_openai_messages_with_tool_calls_are_normalized():
    rec = {"messages": [user("Weather?"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, bot("Sunny.")], "tools": TOOLS}
    row = normalize_record(rec, "oa", 0)
    assert json.loads(row["messages_json"]) == [user("Weather?"), call({"city": "Paris"}), result("sunny"),
                                                bot("Sunny.")]
    assert json.loads(row["tools_json"]) == TOOLS


@pytest.mark.parametrize(("record", "reason"), [
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{not json"}]},
     "invalid_tool_call"),
    ({"conversations": [{"from": "function_call", "value": '{"arguments": {}}'}]}, "invalid_tool_call"),
    ({"conversations": [{"from": "function_call", "value": '{"name": "f", "arguments": [1]}'}]},
     "invalid_tool_call"),
    ({"conversations": [{"from": "human", "value": "x"}], "tools": "[{broken"}, "invalid_tools"),
    ({"conversations": [{"from": "human", "value": "x"}], "tools": '{"name": "f"}'}, "invalid_tools"),
])
def test_malformed_tool_records_are_quarantined(record, reason):
    row = normalize_record(record, "s", 0)
    assert (row["status"], row["reason"]) == ("quarantined", reason) and row["raw_json"]


@pytest.mark.parametrize("messages", [
    [user("a"), result("r"), bot("b")],                    # a result nobody asked for
    [user("a"), call({"city": "x"}), bot("b")],            # a call without its result
    [user("a"), call({"city": "x"}), result("r"), user("c"), bot("d")],  # no reply to the result
])
def test_tool_turns_out_of_order_are_not_alternating(messages):
    from eyas.data.normalize import RecordError

    for regen in (True, False):
        with pytest.raises(RecordError) as err:
            validate_messages(messages, regen)
        assert err.value.code == "not_alternating"


def test_regenerate_mode_keeps_calls_and_results():
    msgs = conversation()
    out = validate_messages(msgs, regenerate=True)
    assert out == [bot(None) if m["role"] == "assistant" and not m.get("tool_calls") else m for m in msgs]
    # A conversation ending on a tool result gets a reply slot (keep mode: nothing to learn).
    assert validate_messages(msgs[:3], regenerate=True) == [*msgs[:3], bot(None)]
    with pytest.raises(ValueError, match="missing_reply"):
        validate_messages(msgs[:3], regenerate=False)


def test_regeneration_writes_text_replies_on_top_of_the_tool_results():
    seen = []

    class Echo:
        def generate(self, prompts):
            return [Generation(f"reply{p[0]}", 1, "stop") for p in prompts]

    def prompt_ids(history, tools):
        seen.append(([m["role"] for m in history], tools))
        return [len(history)]

    (out,) = regenerate([validate_messages(conversation(), regenerate=True)], Echo(), prompt_ids, [TOOLS])
    assert [m.get("content") for m in out.messages] == [
        QUESTIONS[0], "", RESULTS[0], "reply3", QUESTIONS[1], "", RESULTS[1], "reply7"]
    assert out.messages[1] == call(ARGS[0]) and out.finish_reasons == ["stop", "stop"]
    assert seen[0] == (["user", "assistant", "tool"], TOOLS)  # the reply sees the result and tools


# ----------------------------------------------------------------------------- masks, four tokenizers


@pytest.mark.parametrize("name", list(PATHS))
def test_tool_call_is_trained_and_tool_result_is_not(get_tok, name):
    tok, msgs = get_tok(name), conversation()
    out = tokenize_conversation(tok, msgs, template_name=name, tools=TOOLS)
    reference = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=True, date_string=PINNED_DATE_STRING)
    assert out.input_ids == list(reference["input_ids"])
    # Exactly the calls, the replies and their end-of-turn tokens are masked.
    eot = EOT[name]
    last = (QWEN3_EMPTY_THINK if name == "qwen3" else "") + REPLIES[1]
    expected = f"{call_text(name, ARGS[0])}{eot}{REPLIES[0]}{eot}{call_text(name, ARGS[1])}{eot}{last}{eot}"
    assert tok.decode([t for t, m in zip(out.input_ids, out.loss_mask, strict=True) if m]) == expected
    text = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False, date_string=PINNED_DATE_STRING)
    first_call = text.index(json.dumps(ARGS[0]), text.index(QUESTIONS[0]))
    for args, res in zip(ARGS, RESULTS, strict=True):
        # Llama's templates write a tool result with ``tojson`` (a string is iterable in Jinja).
        written = json.dumps(res) if name.startswith("llama") else res
        assert all(out.loss_mask[i] == 1 for i in covering(tok, text, json.dumps(args), first_call))
        assert all(out.loss_mask[i] == 0 for i in covering(tok, text, written, first_call))
    assert all(out.loss_mask[i] == 0 for i in covering(tok, text, "Current weather in a city"))
    # Each masked run starts where the serving prompt (history + tools) ends.
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    runs = mask_runs(out.loss_mask)
    assert len(runs) == len(turns)
    for turn, (start, end) in zip(turns, runs, strict=True):
        prompt = generation_prompt_ids(tok, msgs[:turn], template_name=name, tools=TOOLS)
        assert out.input_ids[:len(prompt)] == prompt and start == len(prompt)
        assert out.input_ids[end - 1] == tok.convert_tokens_to_ids(eot)
    assert count_prompt_tokens(tok, msgs[:3], tools=TOOLS) == len(generation_prompt_ids(tok, msgs[:3], tools=TOOLS))


def test_qwen3_thinking_off_trains_calls_and_answers_only(get_tok):
    tok, msgs = get_tok("qwen3"), conversation()
    out = tokenize_conversation(tok, msgs, template_name="qwen3", enable_thinking=False, tools=TOOLS)
    masked = tok.decode([t for t, m in zip(out.input_ids, out.loss_mask, strict=True) if m])
    calls = [call_text("qwen3", args) for args in ARGS]
    assert masked == f"{calls[0]}<|im_end|>{REPLIES[0]}<|im_end|>{calls[1]}<|im_end|>{REPLIES[1]}<|im_end|>"
    prompt = generation_prompt_ids(tok, msgs[:7], enable_thinking=False, tools=TOOLS)
    assert tok.decode(prompt).endswith("<tool_response>\n" + RESULTS[1] + "\n</tool_response><|im_end|>\n"
                                       "<|im_start|>assistant\n" + QWEN3_EMPTY_THINK)


@pytest.mark.parametrize("name", ["qwen2.5-instruct", "llama-3.1-instruct"])
def test_real_glaive_conversation_masks_its_calls(get_tok, glaive_rows, name):
    tok, row = get_tok(name), glaive_rows[0]
    msgs, tools = json.loads(row["messages_json"]), json.loads(row["tools_json"])
    out = tokenize_conversation(tok, msgs, template_name=name, tools=tools)
    masked = tok.decode([t for t, m in zip(out.input_ids, out.loss_mask, strict=True) if m])
    args = json.dumps(msgs[3]["tool_calls"][0]["function"]["arguments"])
    assert '"search_recipes", ' in masked and args in masked
    assert msgs[4]["content"] not in masked and "Search for recipes" not in masked


# ----------------------------------------------------------------------------- no tool support


@pytest.mark.parametrize("template", [None, CHATML], ids=["stories260k", "chatml"])
def test_template_without_tools_is_refused_with_its_reason(assets, template):
    tok = load_tokenizer(str(assets / "models/stories260k"))
    if template is not None:
        tok.chat_template = template
    msgs = conversation()
    for tools in (TOOLS, None):
        with pytest.raises(TemplateWithoutToolsError, match=r"'tpl' has no tool support") as err:
            tokenize_conversation(tok, msgs, template_name="tpl", tools=tools)
        assert err.value.code == "template_without_tools"
        with pytest.raises(TemplateWithoutToolsError):
            count_prompt_tokens(tok, msgs[:3], template_name="tpl", tools=tools)
    with pytest.raises(TemplateWithoutToolsError, match="declares 1 tool"):  # declared, never called
        generation_prompt_ids(tok, [user("hi")], template_name="tpl", tools=TOOLS)
    assert count_prompt_tokens(tok, [user("hi")], template_name="tpl") > 0  # no tools: fine


@pytest.mark.parametrize(("messages", "why"), [
    ([user("a"), result("r"), bot("b")], "role 'tool' where 'assistant' or 'tool_call' belongs"),
    ([user("a"), call({"city": "<|im_end|>"}), result("r"), bot("b")], "control token '<\\|im_end\\|>'"),
    ([user("a"), call({"city": "x"}), result("r")], "must end with a assistant turn"),
    ([user("a"), bot("b") | {"tool_calls": []}], "tool_calls must be a non-empty list"),
    ([user("a"), bot("b") | {"name": "x"}], "exactly the keys"),
])
def test_bad_tool_messages_raise(get_tok, messages, why):
    with pytest.raises(ChatTemplateError, match=rf"'tpl'.*{why}"):
        tokenize_conversation(get_tok("qwen2.5-instruct"), messages, template_name="tpl", tools=TOOLS)


# ----------------------------------------------------------------------------- stage steps


def rows_of(glaive_rows: list[dict[str, Any]], n: int) -> Any:
    return to_table([{**r, "file": "glaive.json", "line": i + 1} for i, r in enumerate(glaive_rows[:n])])


def test_stage_quarantines_tool_use_for_a_template_without_tools(stories260k, glaive_rows):
    cfg = DataConfig(target=str(stories260k), generation=GenerationConfig(mode="keep"), max_length=100_000)
    rows = to_rows(Validator(cfg)(rows_of(glaive_rows, 300)))
    reasons = {(r["status"], r["reason"]) for r in rows}
    assert reasons == {("ok", ""), ("quarantined", "template_without_tools")}
    held = [r for r in rows if r["reason"] == "template_without_tools"]
    assert len(held) == 191 and "has no tool support" in held[0]["detail"]
    raw = json.loads(held[0]["raw_json"])  # the quarantined row keeps its tools
    assert raw["tools"][0]["function"]["name"] and raw["messages"]


def test_stage_tokenizes_tool_use_with_the_targets_template(stories260k, glaive_rows):
    cfg = DataConfig(target=str(stories260k), tokenizer="assets:tokenizers/qwen2.5-instruct",
                     generation=GenerationConfig(mode="keep"), max_length=4096)
    rows = to_rows(Templater(cfg)(Validator(cfg)(rows_of(glaive_rows, 12))))
    assert {r["status"] for r in rows} == {"ok"}
    tool_rows = [r for r in rows if "tool_calls" in r["messages_json"]]
    assert tool_rows and all(r["tools_json"] and r["num_loss_tokens"] for r in tool_rows)


def test_a_cut_reply_after_a_kept_tool_call_is_the_one_unmasked(stories260k, get_tok):
    """Finish reasons count generated replies only: "stop,length" is reply 0 and reply 1, the
    assistant turns 0 and 2 (turn 1 is the kept tool call)."""
    cfg = DataConfig(target=str(stories260k), tokenizer="assets:tokenizers/qwen2.5-instruct")
    msgs = [user("Hi"), bot("Hello."), *conversation()[:4]]
    row = {"id": "t", "source": "s", "messages_json": json.dumps(msgs), "tools_json": json.dumps(TOOLS),
           "finish_reasons": "stop,length"}
    (out,) = to_rows(Templater(cfg)(to_table([row])))
    tok = get_tok("qwen2.5-instruct")
    assert out["loss_mask"] == tokenize_conversation(tok, msgs, tools=TOOLS, unfinished={2}).loss_mask
    full = tokenize_conversation(tok, msgs, tools=TOOLS).loss_mask
    (changed,) = [i for i, (a, b) in enumerate(zip(full, out["loss_mask"], strict=True)) if a != b]
    assert tok.decode(out["input_ids"][changed]) == "<|im_end|>"
    assert tok.decode(out["input_ids"][:changed]).endswith(REPLIES[0])


def test_pii_in_tool_calls_and_results_is_redacted(stories260k):
    cfg = DataConfig(target=str(stories260k))
    msgs = [user("Mail my friend."),
            {**call({}), "tool_calls": [{"type": "function", "function": {
                "name": "send_email", "arguments": {"to": "jo@example.com", "body": "hi"}}}]},
            result('{"status": "sent", "callback": "780-999-2181"}'), bot("Done.")]
    row = {"id": "p", "source": "s", "messages_json": json.dumps(msgs), "tools_json": ""}
    (out,) = to_rows(PiiScrubber(cfg)(to_table([row])))
    assert out["status"] == "ok"
    assert "jo@example.com" not in out["messages_json"] and "780-999-2181" not in out["messages_json"]
    scrubbed = json.loads(out["messages_json"])
    assert scrubbed[1]["tool_calls"][0]["function"]["arguments"] == {"to": "[EMAIL_ADDRESS]", "body": "hi"}


def test_a_redaction_that_breaks_a_tool_call_drops_the_conversation():
    msgs = [user("x"), call({"city": "Paris"}), result("r"), bot("y")]
    texts = pii_texts(msgs)
    assert [t["content"] for t in texts][1:3] == ["", json.dumps(msgs[1]["tool_calls"])]
    assert merge_pii_texts(msgs, texts) == msgs
    broken = [*texts[:2], {"role": "assistant", "content": '[{"type": "function", [PERSON]'}, *texts[3:]]
    assert merge_pii_texts(msgs, broken) is None
