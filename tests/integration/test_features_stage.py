"""The features stage on a local Ray: a tiny data artifact -> feature shards, locally and on S3;
the online dataset yields the offline rows; unfinished or mismatched inputs are refused."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from eyas import storage
from eyas.config import ConfigError, load_config
from eyas.features.capture import capture_batch, load_target
from eyas.features.config import FeaturesConfig, FeaturesJobConfig
from eyas.features.online import feature_dataset, feature_info, open_data_artifact
from eyas.features.rows import split_of
from eyas.features.schema import FEATURE_SCHEMA, decode_row
from eyas.features.stage import run_features_stage

pytestmark = pytest.mark.integration

LENGTHS = [12, 40, 7, 25, 33, 18, 9, 30, 21, 16, 5, 27]
MAX_LENGTH = 24
OVER = 5  # rows longer than MAX_LENGTH (40, 25, 33, 30, 27): each splits into two pieces
JOB = Path(__file__).resolve().parents[2] / "jobs" / "extract_features.py"


def data_rows() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(3, 512, (n,), generator=gen).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)  # prompt, then reply
        rows.append({"id": f"tiny:{i}", "source": "tiny", "input_ids": ids, "loss_mask": mask, "num_tokens": n,
                     "num_loss_tokens": sum(mask), "messages_json": "[]", "finish_reasons": "stop"})
    return rows


def write_data_artifact(uri: str, target: str, finished: bool = True) -> str:
    """A data-stage artifact: two Parquet shards (the data stage's column types) + manifest."""
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("input_ids", pa.list_(pa.int32())),
                        ("loss_mask", pa.list_(pa.int8())), ("num_tokens", pa.int32()),
                        ("num_loss_tokens", pa.int32()), ("messages_json", pa.string()),
                        ("finish_reasons", pa.string())])
    fs, path = storage.resolve(storage.join(uri, "data"))
    fs.create_dir(path, recursive=True)
    rows = data_rows()
    for k, part in enumerate((rows[:6], rows[6:])):
        with fs.open_output_stream(f"{path}/part-{k}.parquet") as out:
            pq.write_table(pa.Table.from_pylist(part, schema=schema), out)
    if finished:
        storage.Artifact(uri).write_manifest("data", {"target": target}, "datahash", counts={"kept": len(rows)})
    return uri


def features_cfg(data: str, artifact: str, target: str, **over) -> FeaturesConfig:
    base = {"data": data, "artifact": artifact, "target": target, "aux_layer_ids": [0, 2, 3],
            "max_length": MAX_LENGTH, "eval_fraction": 0.25, "batch_size": 4, "rows_per_shard": 4}
    return FeaturesConfig(**{**base, **over})


def read_rows(uri: str) -> list[dict]:
    fs, path = storage.resolve(uri)
    return sorted(pq.read_table(path, filesystem=fs).to_pylist(), key=lambda r: r["id"])


def expected_ids(split: str, overflow: str, eval_fraction: float = 0.25) -> list[str]:
    out = []
    for i, n in enumerate(LENGTHS):
        if split_of(f"tiny:{i}", eval_fraction) != split or (n > MAX_LENGTH and overflow == "drop"):
            continue
        pieces = -(-n // MAX_LENGTH) if overflow == "split" and n > MAX_LENGTH else 1
        out += [f"tiny:{i}#{k}" for k in range(pieces)] if pieces > 1 else [f"tiny:{i}"]
    return sorted(out)


def run_job(argv: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("extract_features_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_stage_local_end_to_end_and_rerun(ray_local, stories260k, tmp_path):
    """The job script on the default YAML + overrides: counts, rows, numerics, manifest, no-op rerun."""
    data = write_data_artifact(str(tmp_path / "data"), str(stories260k))
    out = str(tmp_path / "features")
    argv = [f"features.data={data}", f"features.artifact={out}", f"features.target={stories260k}",
            f"features.max_length={MAX_LENGTH}", "features.eval_fraction=0.25", "features.batch_size=4",
            "features.rows_per_shard=4"]
    manifest = run_job(argv)
    counts = manifest["counts"]
    assert counts["in"] == 12 and counts["truncated"] == OVER and counts["dropped"] == counts["split"] == 0
    assert counts["out"] == counts["train"] + counts["eval"] == 12 and counts["eval"] > 0
    assert manifest["tokens"]["removed"] == sum(n - MAX_LENGTH for n in LENGTHS if n > MAX_LENGTH)
    assert manifest["target"]["aux_layer_ids"] == [0, 2, 3] and manifest["target"]["hidden_size"] == 64
    assert manifest["bytes_per_token"]["bf16"] == 517 and manifest["bytes_per_token"]["fp8"] == 277
    assert manifest["bytes_per_token"]["reference"] == 8 * 64 + 16 and manifest["files"]["train"] >= 2

    train, held = read_rows(f"{out}/train"), read_rows(f"{out}/eval")
    assert [r["id"] for r in train] == expected_ids("train", "truncate")
    assert [r["id"] for r in held] == expected_ids("eval", "truncate")
    assert manifest["tokens"]["loss"] == sum(sum(r["loss_mask"]) for r in train + held)
    source = {r["id"]: r for r in data_rows()}
    model, device = load_target(str(stories260k), "float32", use_gpu=False)
    for row in train[:3] + held[:1]:
        src = source[row["id"]]
        assert row["input_ids"] == src["input_ids"][:MAX_LENGTH]
        assert row["loss_mask"] == src["loss_mask"][:MAX_LENGTH]
        got = decode_row(row)
        aux, hidden = capture_batch(model, [row["input_ids"]], [1, 3, 4], device)[0]
        # bf16 storage: relative error <= 2**-8 of each value
        torch.testing.assert_close(got["aux"], aux, atol=1e-6, rtol=2**-8)
        torch.testing.assert_close(got["hidden"], hidden, atol=1e-6, rtol=2**-8)

    again = run_job(argv)  # finished with the same config and data: a no-op
    assert again["created_at"] == manifest["created_at"]


def test_stage_on_s3_split_fp8_and_online_rows(ray_local, stories260k, tmp_path, s3_prefix):
    """Data on S3, features written to S3 (split overflow, fp8); the online dataset over the same
    data yields the same rows as the offline artifact, through the same reader."""
    data = write_data_artifact(f"{s3_prefix}/data", str(stories260k))
    cfg = features_cfg(data, f"{s3_prefix}/features", str(stories260k), overflow="split", encoding="fp8",
                       eval_fraction=0.0)  # no eval rows: an empty, readable eval split
    manifest = run_features_stage(FeaturesJobConfig(run={"output": cfg.artifact}, features=cfg))
    counts = manifest["counts"]
    assert counts["split"] == OVER and counts["split_pieces"] == 2 * OVER and counts["truncated"] == 0
    assert counts["out"] == 12 + OVER and manifest["tokens"]["out"] == sum(LENGTHS)
    assert storage.Artifact(cfg.artifact).manifest()["counts"] == counts
    assert counts["eval"] == 0 and feature_dataset(cfg, "eval").count() == 0

    offline = sorted(feature_dataset(cfg, "train").take_all(), key=lambda r: r["id"])
    online = sorted(feature_dataset(cfg.model_copy(update={"mode": "online"}), "train").take_all(),
                    key=lambda r: r["id"])
    assert [r["id"] for r in offline] == [r["id"] for r in online] == expected_ids("train", "split", 0.0)
    for a, b in zip(offline, online, strict=True):
        assert set(a) == set(b) == set(FEATURE_SCHEMA.names) and a["encoding"] == "fp8"
        assert (a["input_ids"], a["loss_mask"], a["num_tokens"]) == (b["input_ids"], b["loss_mask"], b["num_tokens"])
        da, db = decode_row(a), decode_row(b)
        # equal up to one fp8 step (3 mantissa bits), should a batch differ by float rounding
        torch.testing.assert_close(da["aux"], db["aux"], atol=1e-5, rtol=0.125)
        torch.testing.assert_close(da["hidden"], db["hidden"], atol=1e-5, rtol=0.125)
    assert feature_info(cfg)["aux_layer_ids"] == [0, 2, 3] and feature_info(cfg)["encoding"] == "fp8"


def test_unfinished_or_mismatched_data_is_refused(ray_local, stories260k, tmp_path):
    data = write_data_artifact(str(tmp_path / "data"), str(stories260k), finished=False)
    cfg = features_cfg(data, str(tmp_path / "features"), str(stories260k))
    for attempt in (lambda: run_features_stage(FeaturesJobConfig(run={"output": cfg.artifact}, features=cfg)),
                    lambda: feature_dataset(cfg.model_copy(update={"mode": "online"}))):
        with pytest.raises(storage.ArtifactError, match=r"features\.data=.*has no manifest\.json.*not finished"):
            attempt()
    assert not storage.exists(cfg.artifact)
    with pytest.raises(storage.ArtifactError, match=r"features\.artifact=.*has no manifest\.json"):
        feature_dataset(cfg)  # offline mode, no features artifact yet

    other = write_data_artifact(str(tmp_path / "other"), "/somewhere/else/model")
    mismatched = features_cfg(other, str(tmp_path / "f2"), str(stories260k))
    with pytest.raises(ConfigError, match=r"features\.target=.*config\.target='/somewhere/else/model'"):
        open_data_artifact(mismatched)
    allowed = mismatched.model_copy(update={"allow_target_mismatch": True})
    assert open_data_artifact(allowed)["config"]["target"] == "/somewhere/else/model"


def test_job_config_rejects_online_extraction(stories260k, tmp_path):
    job = load_config(FeaturesJobConfig, None, ["features.mode=online"])
    with pytest.raises(ConfigError, match="features.mode=online"):
        run_features_stage(job)
