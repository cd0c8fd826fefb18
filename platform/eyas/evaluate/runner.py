"""The evaluation job: score the held-out split with Ray Data actors, write report + manifest.

Artifact (``run.output``)::

    acceptance.json   the report (``eyas.evaluate.report.summarize``)
    manifest.json     written last: inputs, tau per depth for head and n-gram, timings
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from eyas import storage
from eyas.config import config_hash
from eyas.draft.model import DraftConfig, default_aux_layer_ids, text_config
from eyas.evaluate.config import EvaluateJobConfig
from eyas.evaluate.report import format_table, summarize
from eyas.evaluate.scorer import AcceptanceScorer, merge_stats
from eyas.train.data import feature_datasets, feature_spec
from eyas.train.trainer import absolute

REPORT_FILE = "acceptance.json"


def check_draft_matches(draft_uri: str, target_dir: str, aux_layer_ids: list[int] | None) -> DraftConfig:
    """The draft's config; an error when it was trained on other layers or another vocabulary."""
    config = DraftConfig.from_hf_config(storage.read_json(storage.join(draft_uri, "config.json")))
    tc = text_config(json.loads((Path(target_dir) / "config.json").read_text()))
    default = default_aux_layer_ids(int(tc["num_hidden_layers"]))
    if (config.aux_layer_ids or default) != (aux_layer_ids or default):
        raise ValueError(f"the draft {draft_uri} reads target layers {config.aux_layer_ids} but the "
                         f"features hold layers {aux_layer_ids}; evaluate on features of its layers")
    if config.vocab_size != int(tc["vocab_size"]):
        raise ValueError(f"the draft {draft_uri} has vocab_size {config.vocab_size} but the target "
                         f"{target_dir} has {tc['vocab_size']}: it was trained for another target")
    return config


def score_dataset(ds: Any, cfg: EvaluateJobConfig, target_dir: str) -> dict[str, Any]:
    """Summed statistics over a dataset of feature rows, one actor pool of ``AcceptanceScorer``."""
    import ray.data

    e = cfg.evaluate
    scored = ds.map_batches(
        AcceptanceScorer, batch_size=e.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs={"draft_uri": absolute(e.draft), "target_dir": absolute(target_dir),
                               "depth": e.max_depth,
                               "ngram_min": e.ngram_min, "ngram_max": e.ngram_max,
                               "max_length": e.max_length, "use_gpu": e.num_gpus_per_actor > 0,
                               "torch_threads": e.torch_threads},
        compute=ray.data.ActorPoolStrategy(size=e.num_actors), num_cpus=e.num_cpus_per_actor,
        num_gpus=e.num_gpus_per_actor or None)
    total = None  # the first batch's statistics set the drafters (+corpus when the draft has a store)
    for row in scored.iter_rows():
        stats = json.loads(row["stats"])
        total = stats if total is None else merge_stats(total, stats)
    if total is None or total["rows"] == 0:
        raise ValueError(f"the {e.split} split has no rows to evaluate; check features.artifact")
    return total


def run_evaluation(cfg: EvaluateJobConfig, dataset: Any = None) -> dict[str, Any]:
    """Evaluate ``cfg.evaluate.draft`` on the features' held-out split (or on ``dataset``, any
    ``ray.data.Dataset`` of feature rows); write the report and the manifest; return the manifest."""
    artifact = storage.Artifact(cfg.run.output)
    chash = config_hash(cfg)
    if not artifact.prepare(chash, cfg.run.force):
        print(f"[eyas.evaluate] {artifact.uri} is already finished with this config: nothing to do", flush=True)
        return artifact.manifest()
    started = time.time()
    e = cfg.evaluate
    # Step 1: the features' target and layers must be the draft's.
    spec = feature_spec(cfg.features, e.target, "evaluate.target")
    check_draft_matches(e.draft, spec.target, spec.aux_layer_ids)
    ds = dataset if dataset is not None else feature_datasets(cfg.features, (e.split,))[e.split]
    if e.max_rows:
        ds = ds.limit(e.max_rows)
    # Step 2: score (head chains + n-gram lookup, against data tokens and the target's argmax).
    report = summarize(score_dataset(ds, cfg, spec.target), e.max_depth)
    print(format_table(report), flush=True)
    # Step 3: report, then the manifest.
    storage.write_json(artifact.path(REPORT_FILE), report)
    data = report["references"]["data"]
    return artifact.write_manifest(
        "evaluate", cfg.model_dump(mode="json"), chash,
        inputs={"draft": e.draft, "features": cfg.features.artifact, "split": e.split, "target": spec.target},
        outputs={"report": artifact.path(REPORT_FILE)},
        counts={"rows": report["rows"], "reply_tokens": report["reply_tokens"]},
        tau={name: walks["tau"] for name, walks in data.items()},
        ttt_acc=report["ttt_acc"],
        timings={"total_s": round(time.time() - started, 2)},
    )
