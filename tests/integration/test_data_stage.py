"""The data stage end to end on a local Ray: real files, real tokenizer/model, counts that add up."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from eyas import storage
from eyas.config import load_config
from eyas.data.config import DataJobConfig
from eyas.data.pipeline import run_data_stage

pytestmark = pytest.mark.integration


def write_inputs(tmp_path):
    """Every input shape, PII, and every structural quarantine reason, in three files."""
    sharegpt = [
        {"id": "ok1", "conversations": [{"from": "human", "value": "Tell me about a dog."},
                                        {"from": "gpt", "value": "A dog ran."},
                                        {"from": "human", "value": "And then? Mail me at jo@example.com"},
                                        {"from": "gpt", "value": "It slept."}]},
        {"id": "bad_role", "conversations": [{"from": "robot", "value": "beep"}]},
        {"id": "not_alt", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"id": "sys", "conversations": [{"from": "system", "value": "Be nice."}, {"from": "human", "value": "Hi"}]},
        {"id": "card", "conversations": [{"from": "human", "value": "My card is 4111 1111 1111 1111, ok?"}]},
    ]
    (tmp_path / "chat.json").write_text(json.dumps(sharegpt))
    lines = [json.dumps({"question_id": 1, "turns": ["Tell me a story.", "Make it shorter."]}),
             "{not json",
             json.dumps({"prompt": "Once upon a time " * 200}),
             json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}),
             json.dumps({"messages": [{"role": "assistant", "content": "x"}]}),
             json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return [str(tmp_path / "chat.json"), str(tmp_path / "prompts.jsonl")]


def job_config(stories260k, files, output, **over):
    overrides = [f"run.output={output}", f"data.target={stories260k}", "data.max_length=256",
                 "data.generation.max_new_tokens=12", "data.generation.batch_size=4", "data.batch_size=4",
                 "data.pii.policy={CREDIT_CARD_NUMBER: drop}",
                 "data.sources=" + json.dumps([{"path": f} for f in files])]
    return load_config(DataJobConfig, None, overrides + [f"{k}={v}" for k, v in over.items()])


def test_data_stage_end_to_end(ray_local, stories260k, tmp_path):
    files = write_inputs(tmp_path)
    cfg = job_config(stories260k, files, str(tmp_path / "out"))
    manifest = run_data_stage(cfg)
    counts = manifest["counts"]
    assert counts["read"] == 11
    assert counts["read"] == counts["kept"] + counts["quarantined"] + counts["filtered"]
    assert sum(counts["by_reason"].values()) == counts["quarantined"] + counts["filtered"]
    assert counts["by_reason"] == {"unknown_role": 1, "not_alternating": 1, "template_error": 1, "pii_drop": 1,
                                   "invalid_json": 1, "too_long": 1, "empty_content": 1, "no_user_turn": 1}
    assert counts["kept"] == 3  # ok1 (2 turns), MT-bench (2 turns), alpaca

    data = pq.read_table(str(tmp_path / "out" / "data")).to_pylist()
    ids = sorted(r["id"] for r in data)
    assert ids[:2] == ["chat:ok1", "prompts:1"] and ids[2].startswith("prompts:5-")  # alpaca: hashed id
    for row in data:
        assert len(row["input_ids"]) == len(row["loss_mask"]) == row["num_tokens"] <= 256
        assert 0 < row["num_loss_tokens"] == sum(row["loss_mask"]) < row["num_tokens"]
        messages = json.loads(row["messages_json"])
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert all(r for r in replies) and "A dog ran." not in replies  # regenerated, not the dataset's
    ok1 = next(r for r in data if r["id"] == "chat:ok1")
    assert "[EMAIL_ADDRESS]" in ok1["messages_json"] and "jo@example.com" not in ok1["messages_json"]

    quarantine = pq.read_table(str(tmp_path / "out" / "quarantine")).to_pylist()
    assert len(quarantine) == 8 and all(r["reason"] and r["detail"] for r in quarantine)
    dropped = next(r for r in quarantine if r["reason"] == "pii_drop")
    assert "4111" not in json.dumps(dropped) and "CREDIT_CARD_NUMBER" in dropped["detail"]
    assert manifest["pii"]["hits"] == {"CREDIT_CARD_NUMBER": 1, "EMAIL_ADDRESS": 1}
    report = storage.read_json(str(tmp_path / "out" / "pii_report.json"))
    assert report["hits"] == manifest["pii"]["hits"] and "jo@example.com" not in json.dumps(report)
    assert manifest["tokens"]["generated"] > 0 and manifest["config_hash"]

    again = run_data_stage(cfg)  # finished with the same config: a no-op
    assert again["created_at"] == manifest["created_at"]


def test_data_stage_keep_mode_on_s3(ray_local, stories260k, tmp_path, s3_prefix):
    """Inputs read from and the artifact written to a real S3 server; dataset replies kept."""
    files = write_inputs(tmp_path)
    remote = []
    for f in files:
        uri = f"{s3_prefix}/in/{f.rsplit('/', 1)[1]}"
        storage.write_bytes(uri, Path(f).read_bytes())
        remote.append(uri)
    cfg = job_config(stories260k, remote, f"{s3_prefix}/out", **{"data.generation.mode": "keep",
                                                                 "data.pii.backend": "none"})
    manifest = run_data_stage(cfg)
    counts = manifest["counts"]
    assert counts["read"] == 11 and counts["by_reason"]["missing_reply"] == 4  # card, sys, MT-bench, long prompt
    assert manifest["tokens"]["generated"] == 0
    fs, path = storage.resolve(f"{s3_prefix}/out/data")
    data = pq.read_table(path, filesystem=fs).to_pylist()
    ok1 = next(r for r in data if r["id"] == "chat:ok1")
    assert "A dog ran." in ok1["messages_json"]
    assert storage.Artifact(f"{s3_prefix}/out").manifest()["counts"] == counts


def test_bad_files_do_not_stop_the_run_and_are_all_listed(ray_local, stories260k, tmp_path):
    """A directory mixing good and every kind of bad file: the run finishes, counts add up, every
    unreadable or skipped file is named, and quarantine keeps no raw PII."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.jsonl").write_bytes(b'{"instruction": "Say hi", "input": "", "output": "hi"}\n'
                                     b'{"prompt": "Tell me a story."}\n{"prompt": "caf\xe9"}\n'
                                     b'{"conversations": [{"from": "robot", "value": "I am jo@example.com"}]}\n')
    (src / "empty.json").write_bytes(b"")
    (src / "truncated.json").write_bytes(b'[{"prompt": "a"}, {"pro')
    (src / "binary.json").write_bytes(bytes(range(256)))
    (src / "latin1.json").write_bytes('[{"prompt": "caf\xe9"}]'.encode("latin-1"))
    (src / "notes.txt").write_text("not a prompt file")
    cfg = job_config(stories260k, [str(src)], str(tmp_path / "out"), **{"data.generation.mode": "keep"})
    manifest = run_data_stage(cfg)
    counts = manifest["counts"]
    assert counts["read"] == 8 == counts["kept"] + counts["quarantined"] + counts["filtered"]
    assert counts["kept"] == 1
    assert counts["by_reason"] == {"unreadable_file": 4, "invalid_encoding": 1, "unknown_role": 1,
                                   "missing_reply": 1}
    assert sorted(f["file"].rsplit("/", 1)[1] for f in manifest["files"]["unreadable"]) == [
        "binary.json", "empty.json", "latin1.json", "truncated.json"]
    assert [f.rsplit("/", 1)[1] for f in manifest["files"]["skipped"]] == ["notes.txt"]
    quarantine = pq.read_table(str(tmp_path / "out" / "quarantine")).to_pylist()
    assert len(quarantine) == 7 and "jo@example.com" not in json.dumps(quarantine)
    assert all(r["file"] and r["reason"] for r in quarantine)
    with pytest.raises(Exception, match="could not be read"):  # rerun, now strict: same manifest, exit non-zero
        run_data_stage(job_config(stories260k, [str(src)], str(tmp_path / "out2"),
                                  **{"data.generation.mode": "keep", "data.fail_on_unreadable": "true"}))
    assert storage.Artifact(str(tmp_path / "out2")).manifest()["files"]["unreadable"]
