"""Bad input never stops the data stage or vanishes; quarantine holds no raw PII (no Ray here).

Unreadable files become one ``unreadable_file`` row each, non-UTF-8 JSONL lines are quarantined
alone, huge records are rejected before any per-turn work, raw text in quarantine is capped and
PII-scrubbed, zero-width replies are empty, and a reply cut by the token limit is not trained
to end its turn.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eyas.data.chat import load_tokenizer, tokenize_conversation
from eyas.data.config import DataConfig, SourceConfig
from eyas.data.normalize import RAW_JSON_CAP, RecordError
from eyas.data.pipeline import UnreadableInputError, check_unreadable, skipped_files
from eyas.data.stages import PiiScrubber, Validator, read_file_rows, set_status, to_rows, to_table
from eyas.data.validate import is_blank, validate_messages

BAD_FILES = {
    "empty.json": b"",
    "truncated.json": b'[{"prompt": "a"}, {"prom',
    "binary.json": bytes(range(256)) * 4,
    "latin1.json": '[{"prompt": "caf\xe9"}]'.encode("latin-1"),
    "corrupt.parquet": b"PAR1 this is not parquet",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_an_unreadable_file_becomes_one_named_row(name):
    rows = read_file_rows({"bytes": BAD_FILES[name], "path": f"/in/{name}"}, "src", "auto", None)
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "quarantined" and row["reason"] == "unreadable_file"
    assert row["file"] == f"/in/{name}" and name in row["detail"]


def test_a_non_utf8_jsonl_line_is_quarantined_alone_with_its_line():
    data = b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n\n{"prompt": "b"}\n'
    rows = read_file_rows({"bytes": data, "path": "/in/x.jsonl"}, "src", "auto", None)
    assert [(r["status"], r["reason"], r["line"]) for r in rows] == [
        ("ok", "", 1), ("quarantined", "invalid_encoding", 2), ("ok", "", 4)]
    assert "line 2" in rows[1]["detail"] and all(r["file"] == "/in/x.jsonl" for r in rows)


def test_other_extensions_are_listed_and_unreadable_files_can_fail_the_job(tmp_path):
    (tmp_path / "good.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "notes.txt").write_text("not a prompt file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path))])
    assert sorted(skipped_files(cfg)) == [str(tmp_path / "notes.txt"), str(tmp_path / "sub" / "image.png")]
    manifest = {"files": {"unreadable": [{"file": "/in/empty.json", "error": "JSONDecodeError"}],
                          "skipped": []}}
    assert check_unreadable(manifest, cfg) is manifest  # default: go on, the manifest lists it
    with pytest.raises(UnreadableInputError, match="/in/empty.json"):
        check_unreadable(manifest, cfg.model_copy(update={"fail_on_unreadable": True}))


def user(c):
    return {"role": "user", "content": c}


def bot(c):
    return {"role": "assistant", "content": c}


def test_ten_thousand_turns_are_rejected_at_once():
    messages = [user("hi"), bot("hello")] * 5000
    start = time.perf_counter()
    with pytest.raises(RecordError) as err:
        validate_messages(messages, regenerate=True, max_turns=256)
    assert err.value.code == "too_many_turns" and time.perf_counter() - start < 0.5


def test_characters_are_capped_before_tokenizing(stories260k):
    cfg = DataConfig(target=str(stories260k), max_length=256)
    validator = Validator(cfg)
    row = to_rows(to_table([{"id": "big", "source": "s",
                             "messages_json": json.dumps([user("x " * 2_500_000)])}]))[0]
    start = time.perf_counter()
    with pytest.raises(RecordError) as err:
        validator.check(row)
    assert err.value.code == "too_long" and "characters" in err.value.detail
    assert time.perf_counter() - start < 2  # tokenizing 5 MB took ~10 s


@pytest.mark.parametrize("text", ["\u200b", "\u200b\u200d\u2060\ufeff", " \u00a0\u3000\n", "\u2028"])
def test_zero_width_and_format_only_text_is_empty(text):
    assert is_blank(text)
    with pytest.raises(RecordError, match="empty_content"):
        validate_messages([user(text), bot("ok")], regenerate=False)
    assert not is_blank("a\u200b")


def test_raw_json_is_capped_with_a_hash_of_the_whole():
    row = to_rows(to_table([{"id": "r", "source": "s", "messages_json": "y" * (RAW_JSON_CAP * 3)}]))[0]
    set_status(row, "quarantined", "too_long", "too long")
    assert len(row["raw_json"]) == RAW_JSON_CAP and len(row["raw_sha256"]) == 64


def test_quarantined_raw_text_goes_through_the_pii_policy(stories260k):
    cfg = DataConfig(target=str(stories260k))
    rows = read_file_rows({"bytes": json.dumps([{"conversations": [
        {"from": "robot", "value": "mail jo@example.com or call 780-999-2181"}]}]).encode(),
        "path": "/in/c.json"}, "src", "auto", None)
    assert rows[0]["reason"] == "unknown_role" and "jo@example.com" in rows[0]["raw_json"]
    (out,) = to_rows(PiiScrubber(cfg)(to_table(rows)))
    assert "jo@example.com" not in out["raw_json"] and "780-999-2181" not in out["raw_json"]
    assert "[EMAIL_ADDRESS]" in out["raw_json"] and out["raw_sha256"]


def test_a_truncated_reply_is_kept_without_its_end_of_turn_token(stories260k):
    tok = load_tokenizer(str(stories260k))
    messages = [user("Tell me a story."), bot("Once upon a time there was a cat")]
    done = tokenize_conversation(tok, messages)
    cut = tokenize_conversation(tok, messages, unfinished={0})
    assert done.input_ids == cut.input_ids
    eot = tok.convert_tokens_to_ids("</s>")
    last = max(i for i, t in enumerate(done.input_ids) if t == eot)
    assert done.loss_mask[last] == 1 and cut.loss_mask[last] == 0
    assert cut.num_loss_tokens == done.num_loss_tokens - 1


def test_parquet_rows_carry_their_index(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "p.parquet")
    rows = read_file_rows({"bytes": (tmp_path / "p.parquet").read_bytes(), "path": "p.parquet"}, "s", "auto", None)
    assert [(r["status"], r["line"]) for r in rows] == [("ok", 1), ("ok", 2)]


def test_templater_masks_the_end_of_turn_of_a_reply_cut_by_the_limit(stories260k):
    from eyas.data.stages import Templater

    cfg = DataConfig(target=str(stories260k))
    messages = json.dumps([user("Tell me a story."), bot("Once upon a time there was a cat")])
    rows = [{"id": i, "source": "s", "messages_json": messages, "finish_reasons": reason}
            for i, reason in (("done", "stop"), ("cut", "length"))]
    done, cut = to_rows(Templater(cfg)(to_table(rows)))
    assert done["status"] == cut["status"] == "ok" and done["input_ids"] == cut["input_ids"]
    assert done["loss_mask"][-1] == 1 and cut["loss_mask"][-1] == 0  # </s> closes the conversation
    assert cut["num_loss_tokens"] == done["num_loss_tokens"] - 1


def test_a_zero_width_regenerated_reply_is_filtered_as_empty():
    from types import SimpleNamespace

    from eyas.data.config import GenerationConfig
    from eyas.data.regenerate import Regenerated
    from eyas.data.stages import Regenerator

    stub = SimpleNamespace(cfg=GenerationConfig())
    row = to_rows(to_table([{"id": "z", "source": "s", "messages_json": "[]"}]))[0]
    res = Regenerated([user("hi"), bot("\u200b\u200b")], ["stop"], 2)
    Regenerator._filter(stub, row, res)
    assert (row["status"], row["reason"]) == ("filtered", "empty_reply")
