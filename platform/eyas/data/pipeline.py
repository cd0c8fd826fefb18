"""The data stage end to end on Ray Data: read -> validate -> PII -> regenerate -> template -> write.

Artifact layout (``run.output``)::

    data/*.parquet        id, source, input_ids, loss_mask, num_tokens, num_loss_tokens,
                          messages_json (the final text conversation), tools_json (the tools
                          it declares, "" when none), finish_reasons
    quarantine/*.parquet  id, source, file, line, status, reason, detail, raw_json, raw_sha256
                          (every row not kept; raw_json capped and PII-scrubbed like the data)
    pii_report.json       hits per info type, conversations redacted / dropped (no values)
    manifest.json         written last: config, inputs, counts, tokens, timings, versions
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from eyas import storage
from eyas.assets import resolve_asset
from eyas.config import config_hash
from eyas.data.config import DataConfig, DataJobConfig
from eyas.data.stages import PiiScrubber, Regenerator, Templater, Validator, read_file_rows

PROMPT_SUFFIXES = (".jsonl", ".json", ".parquet")
DATA_COLUMNS = ["id", "source", "input_ids", "loss_mask", "num_tokens", "num_loss_tokens", "messages_json",
                "tools_json", "finish_reasons"]
QUARANTINE_COLUMNS = ["id", "source", "file", "line", "status", "reason", "detail", "raw_json", "raw_sha256"]
LIGHT_CPUS = 0.25  # tokenizer/regex steps: let them share cores with the generation actors
SUMMARY_COLUMNS = ["status", "reason", "pii_hits_json", "generated_tokens", "finish_reasons", "num_tokens",
                   "num_loss_tokens", "file", "detail"]


class UnreadableInputError(RuntimeError):
    """Some prompt files could not be read and ``data.fail_on_unreadable`` is set."""


def source_files(cfg: DataConfig) -> list[tuple[Any, list[str]]]:
    """Each configured source with its expanded file URIs."""
    out = []
    for i, src in enumerate(cfg.sources):
        uri = resolve_asset(src.path, f"data.sources[{i}].path")
        try:
            out.append((src, storage.expand(uri, PROMPT_SUFFIXES)))
        except storage.ArtifactError as exc:
            raise storage.ArtifactError(f"data.sources[{i}].path: {exc}") from None
    return out


def skipped_files(cfg: DataConfig) -> list[str]:
    """Files inside source directories that are not prompt files (other extensions): listed in
    the manifest so nothing is left out silently."""
    skipped = []
    for i, src in enumerate(cfg.sources):
        uri = resolve_asset(src.path, f"data.sources[{i}].path")
        if any(ch in uri for ch in "*?[") or not storage.exists(uri):
            continue
        found = storage.list_files(uri)
        if found != [uri]:
            skipped += [f for f in found if not f.endswith(PROMPT_SUFFIXES)]
    return skipped


def read_sources(cfg: DataConfig) -> Any:
    """One Ray dataset of normalized rows over every source file."""
    import ray.data

    from eyas.data.normalize import source_name

    parts = []
    for src, files in source_files(cfg):
        fs, _ = storage.resolve(files[0])
        paths = [storage.resolve(f)[1] for f in files]
        for path in paths:
            name = source_name(path, src.name)
            ds = ray.data.read_binary_files([path], filesystem=fs, include_paths=True, num_cpus=LIGHT_CPUS)
            parts.append(ds.flat_map(read_file_rows, fn_args=(name, src.format, src.limit), num_cpus=LIGHT_CPUS))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def reply_cache_uri(output: str) -> str:
    """Regenerated replies persist beside the artifact (its directory is cleared on a rerun)."""
    return output.rstrip("/") + ".regen_cache"


def build_dataset(cfg: DataConfig, cache_uri: str | None = None) -> Any:
    """The lazy pipeline; nothing runs until it is materialized. ``cache_uri``: where finished
    regenerations persist, so a killed run resumes (None: nothing is kept)."""
    import ray.data

    ds = read_sources(cfg)
    common = {"batch_size": cfg.batch_size, "batch_format": "pyarrow", "fn_constructor_args": (cfg,)}
    light = {**common, "num_cpus": LIGHT_CPUS}
    ds = ds.map_batches(Validator, compute=ray.data.ActorPoolStrategy(size=1), **light)
    if cfg.pii.backend != "none":
        ds = ds.map_batches(PiiScrubber, compute=ray.data.ActorPoolStrategy(size=cfg.pii_actors), **light)
    gen = cfg.generation
    if gen.mode == "regenerate":
        ds = ds.map_batches(Regenerator, compute=ray.data.ActorPoolStrategy(size=gen.num_actors),
                            num_gpus=gen.num_gpus_per_actor, num_cpus=gen.num_cpus_per_actor,
                            **{**common, "batch_size": gen.batch_size,
                               "fn_constructor_args": (cfg, cache_uri)})
    return ds.map_batches(Templater, compute=ray.data.ActorPoolStrategy(size=1), **light)


def summarize(ds: Any) -> dict[str, Any]:
    """Counts per status and reason, PII hits, tokens and finish reasons over the materialized rows."""
    reasons: Counter[str] = Counter()
    status: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    finish: Counter[str] = Counter()
    tokens = {"total": 0, "loss": 0, "generated": 0}
    redacted = 0
    unreadable = []
    for batch in ds.select_columns(SUMMARY_COLUMNS).iter_batches(batch_format="pyarrow", batch_size=4096):
        for row in batch.to_pylist():
            status[row["status"]] += 1
            if row["status"] != "ok":
                reasons[row["reason"]] += 1
            if row["reason"] == "unreadable_file":
                unreadable.append({"file": row["file"], "error": row["detail"]})
            row_hits = json.loads(row["pii_hits_json"])
            hits.update(row_hits)
            redacted += bool(row_hits) and row["status"] == "ok"
            finish.update(r for r in row["finish_reasons"].split(",") if r)
            tokens["generated"] += row["generated_tokens"]
            if row["status"] == "ok":
                tokens["total"] += row["num_tokens"]
                tokens["loss"] += row["num_loss_tokens"]
    counts = {"read": sum(status.values()), "kept": status["ok"], "quarantined": status["quarantined"],
              "filtered": status["filtered"], "by_reason": dict(sorted(reasons.items()))}
    pii = {"hits": dict(sorted(hits.items())), "conversations_redacted": redacted,
           "conversations_dropped": reasons["pii_drop"]}
    files = {"unreadable": sorted(unreadable, key=lambda f: f["file"])}
    return {"counts": counts, "pii": pii, "tokens": tokens, "finish_reasons": dict(finish), "files": files}


def write_outputs(ds: Any, out: storage.Artifact, rows_per_shard: int) -> dict[str, str]:
    """Kept rows to ``data/``, everything else to ``quarantine/`` (both Parquet)."""
    outputs = {"data": out.path("data"), "quarantine": out.path("quarantine")}
    from ray.data.expressions import col

    kept = ds.filter(expr=col("status") == "ok").select_columns(DATA_COLUMNS)
    rest = ds.filter(expr=col("status") != "ok").select_columns(QUARANTINE_COLUMNS)
    for part, uri in ((kept, outputs["data"]), (rest, outputs["quarantine"])):
        fs, path = storage.resolve(uri)
        part.write_parquet(path, filesystem=fs, max_rows_per_file=rows_per_shard)
    return outputs


def run_data_stage(job: DataJobConfig) -> dict[str, Any]:
    """Run (or skip, when finished with the same config) the data stage; return its manifest."""
    out = storage.Artifact(job.run.output)
    digest = config_hash(job.data)
    if not out.prepare(digest, job.run.force):
        print(f"data stage: {out.uri} is complete for this config; skipping (run.force=true reruns it)")
        return check_unreadable(out.manifest(), job.data)
    start = time.perf_counter()
    inputs = [f for _, files in source_files(job.data) for f in files]
    cache_uri = reply_cache_uri(job.run.output) if job.data.generation.resume else None
    ds = build_dataset(job.data, cache_uri).materialize()
    summary = summarize(ds)
    summary["files"]["skipped"] = skipped_files(job.data)
    outputs = write_outputs(ds, out, job.data.rows_per_shard)
    outputs["pii_report"] = out.path("pii_report.json")
    storage.write_json(outputs["pii_report"], {"backend": job.data.pii.backend, **summary["pii"]})
    elapsed = time.perf_counter() - start
    summary["timings"] = {"total_s": round(elapsed, 2),
                          "generated_tokens_per_s": round(summary["tokens"]["generated"] / elapsed, 2)}
    manifest = out.write_manifest("data", job.data.model_dump(mode="json"), digest, inputs=inputs,
                                  outputs=outputs, **summary)
    return check_unreadable(manifest, job.data)


def check_unreadable(manifest: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """Name every unreadable and skipped input file; raise if ``data.fail_on_unreadable``.

    The manifest is written first either way, so a failed run still records what it read."""
    files = manifest.get("files", {})
    for f in files.get("unreadable", []):
        print(f"data stage: unreadable input file {f['file']}: {f['error']}")
    if files.get("skipped"):
        print(f"data stage: skipped {len(files['skipped'])} file(s) that are not .jsonl/.json/.parquet: "
              + ", ".join(files["skipped"][:20]))
    if files.get("unreadable") and cfg.fail_on_unreadable:
        names = ", ".join(f["file"] for f in files["unreadable"])
        raise UnreadableInputError(f"{len(files['unreadable'])} input file(s) could not be read: {names}. "
                                   "Fix or remove them, or set data.fail_on_unreadable=false to go on "
                                   "without them (they stay listed in the manifest).")
    return manifest
