"""Feature rows as a Ray dataset: the one pipeline behind both offline and online features.

    data artifact (data/*.parquet) -> select_rows (eval split + overflow) -> TargetCapture actors
    -> FEATURE_SCHEMA rows

Offline, the stage writes that dataset to ``<artifact>/{train,eval}``; online, the trainer
iterates it directly. ``feature_dataset(cfg, split)`` gives the trainer either one, with the
same rows, so one code path (``eyas.features.schema.collate``) consumes both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from eyas import metrics, storage
from eyas.assets import resolve_asset
from eyas.config import ConfigError
from eyas.features.capture import TargetInfo, capture_batch, load_target, target_info
from eyas.features.config import FeaturesConfig
from eyas.features.rows import SPLITS, select_rows
from eyas.features.schema import FEATURE_SCHEMA, encode_row
from eyas.runtime import actor_threads, use_torch_threads
from eyas.targets import resolve_target

PROGRESS_EVERY = 64  # rows between an actor's progress lines
LIGHT_CPUS = 0.25  # the split/overflow step is cheap: let it share cores with the target actors


def data_files_uri(cfg: FeaturesConfig) -> str:
    return storage.join(cfg.data, "data")


def _same_model(a: str, b: str) -> bool:
    """Two model locations name the same model (local paths compared after resolving links)."""
    if Path(a).exists() and Path(b).exists():
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def finished_manifest(uri: str, key: str) -> dict[str, Any]:
    """The manifest of the artifact at ``uri``; an unfinished one is refused naming config ``key``."""
    try:
        return storage.Artifact(uri).manifest()
    except storage.ArtifactError as exc:
        raise storage.ArtifactError(f"{key}={uri!r}: {exc}") from None


def open_data_artifact(cfg: FeaturesConfig) -> dict[str, Any]:
    """The data artifact's manifest, after checking it is finished, is a data-stage artifact and
    was made with the same target as ``features.target``."""
    manifest = finished_manifest(cfg.data, "features.data")
    if manifest.get("stage") != "data":
        raise storage.ArtifactError(f"features.data={cfg.data!r} holds a {manifest.get('stage')!r} "
                                    "artifact; point it at the data stage's output (run.output of prepare_data)")
    data_target = (manifest.get("config") or {}).get("target")
    if data_target is None:
        raise storage.ArtifactError(f"{cfg.data}/manifest.json has no config.target; rerun the data stage")
    if cfg.target == data_target:  # the same name (a registered target, a path or an id)
        return manifest
    ours = resolve_target(cfg.target, "features.target")
    theirs = resolve_asset(data_target, "data manifest config.target")  # may live on another machine
    if not _same_model(ours, theirs) and not cfg.allow_target_mismatch:
        raise ConfigError(
            f"features.target={cfg.target!r} ({ours}) is not the data stage's target: the data "
            f"manifest's config.target={data_target!r} ({theirs}) tokenized and generated the data. "
            "Use the same model, or set features.allow_target_mismatch=true if they share a tokenizer "
            "on purpose.")
    return manifest


def feature_target_info(cfg: FeaturesConfig) -> TargetInfo:
    """The target's sizes and validated capture layers; max_length must fit its context."""
    info = target_info(resolve_target(cfg.target, "features.target"), cfg.aux_layer_ids)
    if info.max_position_embeddings and cfg.max_length > info.max_position_embeddings:
        raise ConfigError(f"features.max_length={cfg.max_length} exceeds the target's "
                          f"max_position_embeddings={info.max_position_embeddings}; lower features.max_length")
    return info


class TargetCapture:
    """Ray Data callable: rows (id, input_ids, loss_mask) -> ``FEATURE_SCHEMA`` rows.

    One target per actor, loaded in ``__init__``; each ``__call__`` runs one padded forward
    over its batch (CPU fp32 or GPU bf16 by default)."""

    def __init__(self, cfg: FeaturesConfig, info: TargetInfo) -> None:
        self.threads = actor_threads(cfg.torch_threads, cfg.num_cpus_per_actor)
        self.cfg, self.info = cfg, info
        self.rows_done = self.tokens_done = 0  # this actor's progress line
        self.model, self.device = load_target(info.path, cfg.dtype, cfg.num_gpus_per_actor > 0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        use_torch_threads(self.threads)
        rows = batch.to_pylist()
        if not rows:
            return FEATURE_SCHEMA.empty_table()
        start = time.perf_counter()
        captured = capture_batch(self.model, [r["input_ids"] for r in rows],
                                 self.info.hidden_states_indices, self.device)
        out = [encode_row(r["id"], r["input_ids"], r["loss_mask"], aux, hidden, self.cfg.encoding)
               for r, (aux, hidden) in zip(rows, captured, strict=True)]
        self._record(sum(len(r["input_ids"]) for r in rows), len(rows), time.perf_counter() - start)
        return pa.Table.from_pylist(out, schema=FEATURE_SCHEMA)

    def _record(self, tokens: int, rows: int, seconds: float) -> None:
        self.rows_done += rows
        self.tokens_done += tokens
        if self.rows_done // PROGRESS_EVERY > (self.rows_done - rows) // PROGRESS_EVERY:
            print(f"[eyas.features] {self.rows_done} rows, {self.tokens_done} tokens captured "
                  f"({tokens / max(seconds, 1e-9):.0f} tokens/s now)", flush=True)
        metrics.inc("eyas_features_tokens_total", tokens, "tokens run through the target for features")
        metrics.inc("eyas_features_rows_total", rows, "feature rows produced")
        if seconds > 0:
            metrics.set_gauge("eyas_features_tokens_per_s", tokens / seconds,
                              "target tokens/s of one feature actor (last batch)")


def build_feature_dataset(cfg: FeaturesConfig, split: str = "train",
                          info: TargetInfo | None = None) -> Any:
    """The lazy ``ray.data.Dataset`` of one split's feature rows (``FEATURE_SCHEMA``), computed by
    target actors; nothing runs until it is iterated or written. Checks the data artifact first."""
    import ray.data

    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    open_data_artifact(cfg)
    info = info or feature_target_info(cfg)
    fs, path = storage.resolve(data_files_uri(cfg))
    ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["id", "input_ids", "loss_mask"])
    ds = ds.map_batches(select_rows, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                        fn_kwargs={"split": split, "eval_fraction": cfg.eval_fraction,
                                   "max_length": cfg.max_length, "overflow": cfg.overflow})
    return ds.map_batches(TargetCapture, fn_constructor_args=(cfg, info), batch_size=cfg.batch_size,
                          batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                          num_gpus=cfg.num_gpus_per_actor, num_cpus=cfg.num_cpus_per_actor)


def feature_dataset(cfg: FeaturesConfig, split: str = "train") -> Any:
    """What the trainer reads: ``read_parquet(<features.artifact>/<split>)`` in offline mode (the
    artifact must be finished), the live target pipeline in online mode. Same rows either way."""
    import ray.data

    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    if cfg.mode == "online":
        return build_feature_dataset(cfg, split)
    artifact = storage.Artifact(cfg.artifact)
    if finished_manifest(cfg.artifact, "features.artifact").get("stage") != "features":
        raise storage.ArtifactError(f"features.artifact={cfg.artifact!r} is not a features artifact; "
                                    "point it at the output of jobs/extract_features.py")
    fs, path = storage.resolve(artifact.path(split))
    return ray.data.read_parquet(path, filesystem=fs)


def feature_info(cfg: FeaturesConfig) -> dict[str, Any]:
    """Target facts a consumer needs (hidden_size, aux_layer_ids, num_layers, target path,
    encoding): from the artifact's manifest offline, from the target's config online."""
    if cfg.mode == "offline":
        manifest = finished_manifest(cfg.artifact, "features.artifact")
        return {**manifest["target"], "encoding": manifest["config"]["encoding"]}
    return {**target_dict(feature_target_info(cfg)), "encoding": cfg.encoding}


def target_dict(info: TargetInfo) -> dict[str, Any]:
    """``TargetInfo`` as recorded in the manifest."""
    return {"path": info.path, "num_layers": info.num_layers, "hidden_size": info.hidden_size,
            "vocab_size": info.vocab_size, "aux_layer_ids": info.aux_layer_ids,
            "hidden_states_indices": info.hidden_states_indices}
