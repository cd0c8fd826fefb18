"""The features stage (offline mode): data artifact -> target forward -> feature shards.

Artifact layout (``run.output`` = ``features.artifact``)::

    train/*.parquet   FEATURE_SCHEMA rows (eyas.features.schema) of the training conversations
    eval/*.parquet    the same for the held-out conversations (sha256 of the id < eval_fraction)
    manifest.json     written last: config, input URIs, counts in/out/truncated/split/dropped,
                      tokens, target (hidden size, aux layer ids), bytes per token, timings
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from eyas import storage
from eyas.config import ConfigError, config_hash
from eyas.features.capture import TargetInfo
from eyas.features.config import FeaturesConfig, FeaturesJobConfig
from eyas.features.online import (
    build_feature_dataset,
    data_files_uri,
    feature_target_info,
    open_data_artifact,
    target_dict,
)
from eyas.features.rows import SPLITS, plan
from eyas.features.schema import ENCODINGS, FEATURE_SCHEMA, bytes_per_token, encode_row

EMPTY_SHARD = "empty.parquet"  # a split without rows still gets a readable (empty) shard


def stage_digest(cfg: FeaturesConfig, data_manifest: dict[str, Any]) -> str:
    """Hash of the features config AND the data artifact's config hash: new data means new features."""
    blob = json.dumps([config_hash(cfg), data_manifest.get("config_hash")]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_lengths(cfg: FeaturesConfig) -> tuple[list[str], list[int]]:
    """Ids and token counts of every data row (two small columns, read in the driver)."""
    fs, path = storage.resolve(data_files_uri(cfg))
    try:
        table = pq.read_table(path, filesystem=fs, columns=["id", "num_tokens"])
    except (FileNotFoundError, pa.ArrowInvalid) as exc:
        raise storage.ArtifactError(f"features.data={cfg.data!r}: cannot read {data_files_uri(cfg)} "
                                    f"({exc}); is it a data-stage artifact with rows?") from exc
    ids = table.column("id").to_pylist()
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dupes:
        raise storage.ArtifactError(
            f"features.data={cfg.data!r}: {len(dupes)} row ids occur more than once (e.g. {dupes[:3]}); "
            "the data artifact holds shards of two runs (e.g. two concurrent runs into one URI). "
            "Rerun the data stage with run.force=true.")
    return ids, table.column("num_tokens").to_pylist()


def measure_bytes_per_token(hidden_size: int, num_tokens: int = 32) -> dict[str, float]:
    """Payload bytes/token of a feature row in each encoding, measured with ``encode_row`` on a
    (T, H) row, against the reference layout 8*H + 16 bytes (bf16 aux + hidden, int64 id + mask)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    aux = torch.randn(num_tokens, 3 * hidden_size, generator=gen)  # (T, 3H)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)  # (T, H)
    ids, mask = [1] * num_tokens, [1] * num_tokens
    out: dict[str, float] = {"reference": float(8 * hidden_size + 16)}
    for enc in ENCODINGS:
        out[enc] = bytes_per_token(encode_row("measure", ids, mask, aux, hidden, enc))
        out[f"{enc}_vs_reference"] = round(out[enc] / out["reference"], 4)
    out["fp8_vs_bf16"] = round(out["fp8"] / out["bf16"], 4)
    return out


def write_split(cfg: FeaturesConfig, info: TargetInfo, split: str, uri: str, rows: int) -> float:
    """Run the pipeline for one split and write its shards; returns seconds taken."""
    start = time.perf_counter()
    fs, path = storage.resolve(uri)
    if rows == 0:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{EMPTY_SHARD}") as out:
            pq.write_table(FEATURE_SCHEMA.empty_table(), out)
        return time.perf_counter() - start
    ds = build_feature_dataset(cfg, split, info)
    ds.write_parquet(path, filesystem=fs, max_rows_per_file=cfg.rows_per_shard)
    return time.perf_counter() - start


def count_written(uri: str) -> dict[str, int]:
    """Rows, tokens, loss tokens and bytes on storage of one written split (small columns only)."""
    fs, path = storage.resolve(uri)
    files = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")]
    table = pq.read_table(path, filesystem=fs, columns=["num_tokens", "loss_mask"])
    return {"rows": table.num_rows, "tokens": int(pc.sum(table["num_tokens"]).as_py() or 0),
            "loss_tokens": int(pc.sum(pc.list_flatten(table["loss_mask"])).as_py() or 0),
            "files": len(files), "bytes": sum(f.size for f in files)}


def check_written(planned: dict[str, Any], written: dict[str, dict[str, int]]) -> None:
    """The rows and tokens on storage must be the ones planned from the data lengths."""
    for split in SPLITS:
        want = (planned["counts"][split], planned["tokens"][split])
        got = (written[split]["rows"], written[split]["tokens"])
        if want != got:
            raise RuntimeError(f"features {split}: planned {want[0]} rows / {want[1]} tokens but wrote "
                               f"{got[0]} / {got[1]}; rerun with run.force=true and report this")


def summarize(cfg: FeaturesConfig, info: TargetInfo, planned: dict[str, Any],
              written: dict[str, dict[str, int]], seconds: dict[str, float]) -> dict[str, Any]:
    """Manifest fields: counts, tokens, target, bytes per token, timings."""
    tokens_out = planned["tokens"]["out"]
    disk = sum(w["bytes"] for w in written.values())
    measured = measure_bytes_per_token(info.hidden_size)
    bpt = {**measured, "encoding": cfg.encoding,
           "disk": round(disk / tokens_out, 2) if tokens_out else None}
    tokens = {**planned["tokens"], "loss": sum(w["loss_tokens"] for w in written.values())}
    total = sum(seconds.values())
    timings = {"total_s": round(total, 2), **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
               "tokens_per_s": round(tokens_out / total, 1) if total else None}
    return {"counts": planned["counts"], "tokens": tokens, "target": target_dict(info),
            "bytes_per_token": bpt, "files": {s: written[s]["files"] for s in SPLITS},
            "timings": timings}


def run_features_stage(job: FeaturesJobConfig) -> dict[str, Any]:
    """Run (or skip, when finished with the same config and data) the features stage; return its manifest."""
    cfg = job.features
    if cfg.mode != "offline":
        raise ConfigError("features.mode=online streams features straight into training and writes "
                          "nothing; run the training job with features.mode=online, or set "
                          "features.mode=offline to extract an artifact")
    data_manifest = open_data_artifact(cfg)
    out = storage.Artifact(job.run.output)
    digest = stage_digest(cfg, data_manifest)
    if not out.prepare(digest, job.run.force):
        print(f"features stage: {out.uri} is complete for this config and data; skipping (run.force=true reruns it)")
        return out.manifest()
    start = time.perf_counter()
    planned = plan(*read_lengths(cfg), cfg.eval_fraction, cfg.max_length, cfg.overflow)
    info = feature_target_info(cfg)
    seconds = {"prepare": time.perf_counter() - start}
    outputs = {split: out.path(split) for split in SPLITS}
    for split in SPLITS:
        seconds[split] = write_split(cfg, info, split, outputs[split], planned["counts"][split])
    written = {split: count_written(outputs[split]) for split in SPLITS}
    check_written(planned, written)
    summary = summarize(cfg, info, planned, written, seconds)
    inputs = {"data": cfg.data, "data_config_hash": data_manifest.get("config_hash"), "target": info.path}
    return out.write_manifest("features", cfg.model_dump(mode="json"), digest, inputs=inputs,
                              outputs=outputs, **summary)
