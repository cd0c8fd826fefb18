"""The driver side of training: resolve the head and its vocabulary, run Ray Train, export.

``run_training(cfg)`` reads the features named by ``cfg.features``; ``run_training(cfg, datasets)``
takes any ``{"train": ray.data.Dataset}`` of ``FEATURE_SCHEMA`` rows instead (the online-mode
seam). A rerun with the same ``train.run_name`` resumes from the run's last checkpoint; a
finished artifact with the same config is a no-op; ``run.force`` starts over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eyas import storage
from eyas.config import config_hash
from eyas.draft.model import DraftConfig, default_aux_layer_ids, text_config
from eyas.draft.vocab import build_vocab_mapping, load_vocab_mapping
from eyas.engine.ngram_store import write_store
from eyas.train.checkpoint import read_train_state
from eyas.train.config import TrainJobConfig
from eyas.train.data import (
    FeatureSpec,
    count_assistant_tokens,
    feature_datasets,
    feature_spec,
    micro_batches_per_epoch,
)
from eyas.train.export import draft_from_checkpoint, export_draft, local_dir, read_draft_config
from eyas.train.loop import LoopSpec, train_loop_per_worker

MAPPING_FILE = "vocab_mapping.safetensors"
DRAFT_DIR = "draft"
CHECKPOINTS_DIR = "checkpoints"


@dataclasses.dataclass
class HeadPlan:
    """The head to train: its config, where its vocab mapping came from, optional init weights."""

    config: DraftConfig
    d2t: Tensor
    t2d: Tensor
    mapping_source: str  # "identity" | "counted" | "init_from:<uri>"
    init_weights_uri: str | None


def absolute(uri: str) -> str:
    """Local paths made absolute: Ray workers and actors run in another working directory."""
    return uri if storage.is_remote(uri) else storage.resolve(uri)[1]


def prepare_run(artifact: storage.Artifact, chash: str, force: bool) -> bool:
    """False when a finished artifact with this config exists (no-op). A finished artifact of
    another config is an error unless ``force`` (which clears it); an unfinished one is KEPT:
    its checkpoints are the resume point. Locks the artifact before a run (one writer)."""
    if force:
        artifact.lock()
        storage.delete_dir(artifact.uri)
        return True
    if not artifact.is_complete():
        artifact.lock()
        return True
    found = artifact.manifest().get("config_hash")
    if found == chash:
        return False
    raise storage.ArtifactError(f"{artifact.uri} already holds a finished training run of another "
                                f"config (hash {found}, now {chash}). Pass run.force=true to overwrite "
                                "it, or choose another run.output.")


def target_config(spec: FeatureSpec) -> dict[str, Any]:
    path = Path(spec.target) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train.target must be a local Hugging Face model "
                                "directory readable on every node (only its embeddings and lm_head load)")
    cfg = json.loads(path.read_text())
    hidden = int(text_config(cfg)["hidden_size"])
    if spec.hidden_size is not None and spec.hidden_size != hidden:
        raise ValueError(f"the features have hidden_size {spec.hidden_size} but the target {spec.target} "
                         f"has {hidden}: the features were computed with another model")
    return cfg


def _same_layers(a: list[int] | None, b: list[int] | None, num_layers: int) -> bool:
    return (a or default_aux_layer_ids(num_layers)) == (b or default_aux_layer_ids(num_layers))


def plan_from_init(init_from: str, spec: FeatureSpec, tcfg: dict[str, Any]) -> HeadPlan:
    """Fine-tuning: the exported draft's config and vocab mapping, REUSED (never rebuilt)."""
    with local_dir(init_from) as directory:
        config = read_draft_config(directory)
        d2t, t2d = load_vocab_mapping(directory)
    tc = text_config(tcfg)
    if (config.vocab_size, config.hidden_size) != (tc["vocab_size"], tc["hidden_size"]):
        raise ValueError(f"train.init_from={init_from}: the draft has vocab {config.vocab_size} / hidden "
                         f"{config.hidden_size} but the target has {tc['vocab_size']} / {tc['hidden_size']}")
    if not _same_layers(config.aux_layer_ids, spec.aux_layer_ids, int(tc["num_hidden_layers"])):
        raise ValueError(f"train.init_from={init_from} reads target layers {config.aux_layer_ids} but the "
                         f"features hold layers {spec.aux_layer_ids}; extract features with the draft's layers")
    config = dataclasses.replace(config, aux_layer_ids=config.aux_layer_ids or spec.aux_layer_ids)
    return HeadPlan(config, d2t, t2d, f"init_from:{init_from}", storage.join(init_from, "model.safetensors"))


def plan_new_head(cfg: TrainJobConfig, spec: FeatureSpec, tcfg: dict[str, Any], count_ds: Any) -> HeadPlan:
    """A fresh head: identity mapping when the target vocab fits, else the most frequent
    assistant tokens of the training data."""
    config = DraftConfig.from_target_config(tcfg, cfg.train.draft_vocab_size, spec.aux_layer_ids)
    if config.draft_vocab_size == config.vocab_size:
        d2t, t2d = build_vocab_mapping(torch.zeros(config.vocab_size, dtype=torch.int64), config.draft_vocab_size)
        return HeadPlan(config, d2t, t2d, "identity", None)
    counts = count_assistant_tokens(count_ds, config.vocab_size)
    if int(counts.sum()) == 0:
        raise ValueError("the training split has no assistant tokens (loss_mask is 0 everywhere); "
                         "check the data stage's chat template / assistant mask")
    d2t, t2d = build_vocab_mapping(counts, config.draft_vocab_size)
    return HeadPlan(config, d2t, t2d, "counted", None)


def token_count_dataset(cfg: TrainJobConfig, train_ds: Any) -> Any:
    """What to count assistant tokens on: the train features offline (ids and mask columns only);
    online, the data stage's artifact, so the target does not run twice."""
    if cfg.features.mode == "offline":
        return train_ds
    import ray.data

    from eyas.features.online import data_files_uri

    files = storage.expand(data_files_uri(cfg.features), (".parquet",))
    fs, _ = storage.resolve(files[0])
    return ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs,
                                 columns=["input_ids", "loss_mask"])


def write_mapping(plan: HeadPlan, uri: str) -> None:
    from safetensors.torch import save

    blob = save({"d2t": plan.d2t.contiguous(), "t2d": plan.t2d.contiguous()},
                metadata={"source": plan.mapping_source})
    storage.write_bytes(uri, blob)


def resumed_plan(cfg: TrainJobConfig, spec: FeatureSpec, tcfg: dict[str, Any], uri: str) -> HeadPlan:
    """An interrupted run keeps the vocab mapping its checkpoints were trained with."""
    from safetensors.torch import load

    blob = storage.read_bytes(uri)
    saved = load(blob)
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    config = DraftConfig.from_target_config(tcfg, cfg.train.draft_vocab_size, spec.aux_layer_ids)
    if saved["d2t"].numel() != config.draft_vocab_size or saved["t2d"].numel() != config.vocab_size:
        raise ValueError(f"{uri}: the saved vocab mapping ({saved['d2t'].numel()} of {saved['t2d'].numel()} "
                         f"ids) does not fit this config's head ({config.draft_vocab_size} of "
                         f"{config.vocab_size}); the run's checkpoints belong to another config "
                         "(set run.force=true to start over)")
    source = header.get("__metadata__", {}).get("source", "counted")
    return HeadPlan(config, saved["d2t"], saved["t2d"], source, None)


def plan_head(cfg: TrainJobConfig, spec: FeatureSpec, train_ds: Any, mapping_uri: str) -> HeadPlan:
    """Decide the head and write its mapping to ``mapping_uri`` (or reuse the one already there)."""
    tcfg = target_config(spec)
    if cfg.train.init_from:
        plan = plan_from_init(cfg.train.init_from, spec, tcfg)
    elif storage.exists(mapping_uri):
        return resumed_plan(cfg, spec, tcfg, mapping_uri)
    else:
        plan = plan_new_head(cfg, spec, tcfg, token_count_dataset(cfg, train_ds))
    write_mapping(plan, mapping_uri)
    return plan


def init_weights_ref(plan: HeadPlan) -> Any:
    """The init draft's weights in Ray's object store (workers need no storage access), or None."""
    if plan.init_weights_uri is None:
        return None
    import ray

    return ray.put(storage.read_bytes(plan.init_weights_uri))


def total_steps(cfg: TrainJobConfig, train_ds: Any) -> int:
    """``train.max_steps``, else ``num_epochs`` worth of optimizer steps over the split."""
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = micro_batches_per_epoch(train_ds.count(), max(t.num_workers, 1), t.batch_size)
    return max(1, math.ceil(t.num_epochs * per_epoch / t.grad_accum))


def make_trainer(cfg: TrainJobConfig, spec: LoopSpec, datasets: dict[str, Any]) -> Any:
    """The ``TorchTrainer``: workers, backend, storage, checkpoints, failure budget, data order."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    scaling = ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                            resources_per_worker=resources if t.num_workers else None)
    fs, path = storage.resolve(storage.join(cfg.run.output, CHECKPOINTS_DIR))
    run = RunConfig(name=t.run_name, storage_path=path,
                    storage_filesystem=fs if storage.is_remote(cfg.run.output) else None,
                    checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                    failure_config=FailureConfig(max_failures=t.max_failures))
    return TorchTrainer(train_loop_per_worker, train_loop_config=spec.to_dict(), scaling_config=scaling,
                        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"), run_config=run,
                        datasets={"train": datasets["train"]},
                        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)))


def export_result(cfg: TrainJobConfig, result: Any, plan: HeadPlan, target: str) -> tuple[dict[str, Any], list[str]]:
    """Train summary of the final checkpoint, and the exported + checked draft directory."""
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; check the worker logs")
    with result.checkpoint.as_directory() as directory:
        state = read_train_state(directory)
        draft = draft_from_checkpoint(directory, plan.config)
    draft_dir = storage.join(cfg.run.output, DRAFT_DIR)
    files = export_draft(draft, draft_dir, target, cfg.train.export_dtype)
    if cfg.train.ngram_store_max_n and cfg.features.mode == "offline":  # online: no stored split
        uri, contexts = write_store(cfg.features.artifact, draft_dir, cfg.train.ngram_store_max_n)
        print(f"[eyas.train] n-gram store of the train split: {contexts:,} contexts -> {uri}", flush=True)
        files.append(uri)
    if cfg.train.num_workers == 0:  # local mode keeps its last checkpoint in a temp dir
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    return dataclasses.asdict(state), files


def run_training(cfg: TrainJobConfig, datasets: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, checkpoint, export ``<output>/draft``, write the manifest; returns the manifest."""
    artifact = storage.Artifact(cfg.run.output)
    chash = config_hash(cfg)
    if not prepare_run(artifact, chash, cfg.run.force):
        print(f"[eyas.train] {artifact.uri} is already finished with this config: nothing to do", flush=True)
        return artifact.manifest()
    started = time.time()
    # Step 1: the features (the seam: any dataset of feature rows) and what they were made from.
    spec = feature_spec(cfg.features, cfg.train.target)
    datasets = dict(datasets or feature_datasets(cfg.features, ("train",)))
    if cfg.train.cache_data:  # later epochs stream from the object store instead of re-reading
        datasets["train"] = datasets["train"].materialize()
    # Step 2: the head and its vocab mapping (reused from init_from or an interrupted run).
    mapping_uri = artifact.path(MAPPING_FILE)
    plan = plan_head(cfg, spec, datasets["train"], mapping_uri)
    max_steps = total_steps(cfg, datasets["train"])
    planned = time.time()
    # Step 3: Ray Train (resumes from <output>/checkpoints/<run_name> when it holds checkpoints).
    loop = LoopSpec(train=cfg.train.model_dump(mode="json"), draft_config=dataclasses.asdict(plan.config),
                    target=absolute(spec.target), vocab_mapping=storage.read_bytes(mapping_uri),
                    max_steps=max_steps, init_weights=init_weights_ref(plan),
                    local_mode=cfg.train.num_workers == 0)
    result = make_trainer(cfg, loop, datasets).fit()
    trained = time.time()
    # Step 4: export, check against the target, manifest last.
    state, files = export_result(cfg, result, plan, spec.target)
    summary = state["summary"]
    k = cfg.train.ttt_length
    return artifact.write_manifest(
        "train", cfg.model_dump(mode="json"), chash,
        inputs={"features": cfg.features.artifact if cfg.features.mode == "offline" else "online",
                "target": spec.target, "init_from": cfg.train.init_from},
        outputs={"draft": storage.join(cfg.run.output, DRAFT_DIR), "draft_files": files,
                 "checkpoint": result.checkpoint.path if cfg.train.num_workers else None,
                 "vocab_mapping": mapping_uri},
        vocab={"source": plan.mapping_source, "draft_vocab_size": plan.config.draft_vocab_size,
               "vocab_size": plan.config.vocab_size},
        aux_layer_ids=plan.config.aux_layer_ids,
        steps=state["step"], epochs_started=state["epoch"] + 1, resumed_at=state["resumed_at"],
        last_steps=state["history"],  # per-step loss / lr / grad_norm since the previous checkpoint
        final={"loss": summary["loss"], **{f"acc_{j}": summary[f"acc_{j}"] for j in range(k)},
               "window_steps": cfg.train.metrics_window},
        tokens_per_s=summary["tokens_per_s"], tokens_per_s_overall=summary["tokens_per_s_overall"],
        tokens_total=state["tokens_total"],
        workers=cfg.train.num_workers,
        timings={"plan_s": round(planned - started, 2), "fit_s": round(trained - planned, 2),
                 "train_loop_s": round(state["train_seconds"], 2), "total_s": round(time.time() - started, 2)},
    )
