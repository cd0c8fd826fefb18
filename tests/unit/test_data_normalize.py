"""Normalizing every supported input shape, and quarantining what cannot be normalized."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eyas.data.normalize import RecordError, normalize_record, parse_file
from eyas.data.validate import validate_messages


def msgs(row):
    return json.loads(row["messages_json"])


def test_sharegpt():
    rec = {"id": "c1", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                         {"from": "gpt", "value": "Hello!"}]}
    row = normalize_record(rec, "sg", 0)
    assert row["status"] == "ok" and row["id"] == "sg:c1"
    assert msgs(row) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}]


def test_openai_messages():
    rec = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    assert msgs(normalize_record(rec, "m", 3)) == rec["messages"]


def test_alpaca_with_and_without_input():
    row = normalize_record({"instruction": "Translate", "input": "bonjour", "output": "hello"}, "a", 0)
    assert msgs(row) == [{"role": "user", "content": "Translate\n\nbonjour"}, {"role": "assistant", "content": "hello"}]
    row = normalize_record({"instruction": "Name a color", "input": "", "output": ""}, "a", 1)
    assert msgs(row) == [{"role": "user", "content": "Name a color"}, {"role": "assistant", "content": None}]


def test_mt_bench_turns_get_reply_slots():
    row = normalize_record({"question_id": 81, "category": "writing", "turns": ["Q1", "Q2"]}, "mt", 0)
    assert row["id"] == "mt:81"
    assert [m["role"] for m in msgs(row)] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs(row)] == ["Q1", None, "Q2", None]


@pytest.mark.parametrize("key", ["prompt", "question", "text"])
def test_plain_prompt(key):
    assert msgs(normalize_record({key: "Tell me a story"}, "p", 0))[0] == {"role": "user", "content": "Tell me a story"}


def test_ids_are_stable_and_distinct():
    a = normalize_record({"prompt": "x"}, "p", 0)["id"]
    assert a == normalize_record({"prompt": "x"}, "p", 0)["id"]
    assert a != normalize_record({"prompt": "y"}, "p", 0)["id"]


@pytest.mark.parametrize("record, reason", [
    ({"foo": 1}, "unknown_shape"),
    ([1, 2], "unknown_shape"),
    ({"conversations": [{"from": "robot", "value": "beep"}]}, "unknown_role"),
    ({"messages": [{"role": "function", "content": "{}"}]}, "unknown_role"),
    ({"instruction": 5}, "non_string_content"),
])
def test_unnormalizable_records_are_quarantined_with_raw(record, reason):
    row = normalize_record(record, "s", 0)
    assert row["status"] == "quarantined" and row["reason"] == reason
    assert json.loads(row["raw_json"]) == record


def test_parse_jsonl_keeps_bad_lines_for_quarantine():
    records = parse_file(b'{"prompt": "a"}\nnot json\n\n{"prompt": "b"}\n', "x.jsonl")
    assert len(records) == 3
    row = normalize_record(records[1], "s", 1)
    assert row["reason"] == "invalid_json" and "line 2" in row["detail"]


def test_parse_json_list_object_and_parquet(tmp_path):
    assert parse_file(b'[{"prompt": "a"}, {"prompt": "b"}]', "x.json") == [{"prompt": "a"}, {"prompt": "b"}]
    assert parse_file(b'{"prompt": "a"}', "x.json") == [{"prompt": "a"}]
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "p.parquet")
    assert parse_file((tmp_path / "p.parquet").read_bytes(), "p.parquet") == [{"prompt": "a"}, {"prompt": "b"}]
    with pytest.raises(RecordError, match="unsupported_file"):
        parse_file(b"", "x.csv")


def user(c):
    return {"role": "user", "content": c}


def bot(c):
    return {"role": "assistant", "content": c}


@pytest.mark.parametrize("messages, code", [
    ([bot("hi")], "no_user_turn"),
    ([{"role": "system", "content": "s"}], "no_user_turn"),
    ([user("a"), user("b")], "not_alternating"),
    ([bot("x"), user("a"), bot("b")], "not_alternating"),
    ([user("a"), {"role": "system", "content": "s"}, bot("b")], "not_alternating"),
    ([user(""), bot("b")], "empty_content"),
    ([user("  "), bot("b")], "empty_content"),
    ([user(["a"]), bot("b")], "non_string_content"),
    ([user(None), bot("b")], "non_string_content"),
])
def test_structural_quarantine_reasons(messages, code):
    for regenerate in (True, False):
        with pytest.raises(RecordError) as err:
            validate_messages(messages, regenerate)
        assert err.value.code == code


def test_keep_mode_needs_every_reply():
    with pytest.raises(RecordError, match="missing_reply"):
        validate_messages([user("a")], regenerate=False)
    with pytest.raises(RecordError, match="missing_reply"):
        validate_messages([user("a"), bot(None)], regenerate=False)
    with pytest.raises(RecordError, match="empty_content"):
        validate_messages([user("a"), bot("")], regenerate=False)


def test_regenerate_mode_clears_replies_and_adds_last_slot():
    out = validate_messages([user("a"), bot("old"), user("b")], regenerate=True)
    assert out == [user("a"), bot(None), user("b"), bot(None)]
