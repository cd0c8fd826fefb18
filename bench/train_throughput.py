"""Training tokens/s through Ray Train vs a plain single-process torch loop, same batches, one run.

    python bench/train_throughput.py                        # artifacts/features if finished, else synthetic
    python bench/train_throughput.py --features artifacts/features --steps 60 --workers 1 2 --report-every 10

Both paths run the same TTT step (eyas.train.loop.TTTModule, AdamW, clip 0.5) over the same
Parquet rows decoded by the same collate. The plain loop reads the rows once with pyarrow and
steps through them in one process; Ray Train streams them with Ray Data into its workers and
adds gloo DDP, ray.train.report every N steps and one checkpoint at the end. The ratio
ray/plain (steady-state tokens/s, first step excluded on both sides) is the Ray Train overhead;
end-to-end seconds (with worker start-up) are printed beside it. Reporting every step shows
Ray Train V2's report throttle (one pending report per worker, drained every 2 s).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from eyas import storage  # noqa: E402
from eyas.config import load_config  # noqa: E402
from eyas.features.schema import FEATURE_SCHEMA, encode_row  # noqa: E402
from eyas.targets import resolve_target  # noqa: E402

AUX_LAYER_IDS = [0, 2, 3]


def synthetic_features(uri: str, target: str, rows: int, length: int, seed: int = 0) -> None:
    """Random features with the target's sizes (throughput does not depend on their values)."""
    from eyas.draft.model import text_config
    from eyas.draft.target import load_target_head

    _, _, cfg = load_target_head(target)
    tc = text_config(cfg)
    h, vocab = int(tc["hidden_size"]), int(tc["vocab_size"])
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        t = length - (i % 7) * 4
        ids = torch.randint(3, vocab, (t,), generator=g).tolist()
        mask = [0] * (t // 4) + [1] * (t - t // 4)
        out.append(encode_row(f"s{i}", ids, mask, torch.randn(t, 3 * h, generator=g), torch.randn(t, h, generator=g)))
    Path(uri, "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(out, schema=FEATURE_SCHEMA), f"{uri}/train/part-00000.parquet")
    info = {"path": target, "num_layers": int(tc["num_hidden_layers"]), "hidden_size": h, "vocab_size": vocab,
            "aux_layer_ids": AUX_LAYER_IDS, "hidden_states_indices": [i + 1 for i in AUX_LAYER_IDS]}
    storage.Artifact(uri).write_manifest("features", {"encoding": "bf16"}, "bench", target=info)


def plain_loop(features: str, batch_size: int, steps: int, max_length: int) -> float:
    """Steady-state tokens/s of one process stepping through the rows (first step excluded)."""
    from eyas.draft.model import DraftConfig, Eagle3Draft
    from eyas.draft.target import load_target_head
    from eyas.features.config import FeaturesConfig
    from eyas.train.config import TrainConfig
    from eyas.train.data import feature_spec, table_to_batch
    from eyas.train.loop import TTTModule
    from eyas.train.optim import build_optimizer
    from eyas.train.trainer import target_config

    torch.set_num_threads(1)
    spec = feature_spec(FeaturesConfig(artifact=features))
    table = pq.read_table(storage.join(features, "train"))
    draft = Eagle3Draft(DraftConfig.from_target_config(target_config(spec), 32000, spec.aux_layer_ids)).float()
    module, (embed, lm_head, _) = TTTModule(draft), load_target_head(spec.target)
    optimizer, scheduler = build_optimizer(module.parameters(), TrainConfig(), steps)
    tokens, seconds, offset = 0, 0.0, 0
    for step in range(steps):
        start = time.perf_counter()
        if offset >= table.num_rows:
            offset = 0
        b = table_to_batch(table.slice(offset, batch_size), max_length)
        offset += batch_size
        loss, *_ = module(embed, lm_head, b["aux"], b["hidden"], b["input_ids"], b["loss_mask"],
                          b["attention_mask"], 7, 0.8)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms allocators; Ray's figure also excludes it
            tokens += int(b["attention_mask"].sum())
            seconds += time.perf_counter() - start
    return tokens / seconds


def ray_train(features: str, workers: int, report_every: int, batch_size: int, steps: int, max_length: int,
              out: str) -> dict:
    """Run eyas.train through Ray Train; returns its manifest (steady-state tokens/s inside: each
    step's time runs from the end of the previous one, reports and data waits included)."""
    from eyas.train.config import TrainJobConfig
    from eyas.train.trainer import run_training

    cfg = load_config(TrainJobConfig, None, [
        f"run.output={out}", f"features.artifact={features}", f"train.num_workers={workers}",
        f"train.report_every={report_every}",
        "train.cpus_per_worker=0.5", f"train.batch_size={batch_size}", f"train.max_steps={steps}",
        f"train.checkpoint_every={steps}", f"train.max_length={max_length}", f"train.metrics_window={steps}",
        "train.cache_data=true", "train.export_dtype=float32"])
    return run_training(cfg)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", default=str(ROOT / "artifacts" / "features"))
    parser.add_argument("--target", default="assets:models/stories260k", help="used for synthetic features")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--report-every", type=int, nargs="+", default=[1, 10],
                        help="ray.train.report every N steps (1 = per step, throttled by Ray Train V2)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="eyas-bench-train-")
    features = args.features
    if not storage.Artifact(features).is_complete():
        features = f"{tmp}/features"
        synthetic_features(features, resolve_target(args.target, "--target"), rows=64, length=96)
        print(f"no finished features at {args.features}: using synthetic stories260k-sized rows at {features}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    plain = plain_loop(features, args.batch_size, args.steps, args.max_length)
    rows = [("plain torch loop (1 process)", plain, None)]
    for n in args.workers:
        for every in args.report_every:
            start = time.perf_counter()
            manifest = ray_train(features, n, every, args.batch_size, args.steps, args.max_length,
                                 f"{tmp}/ray{n}-{every}")
            rows.append((f"Ray Train, {n} worker(s), report/{every}", manifest["tokens_per_s"],
                         time.perf_counter() - start))
    print(f"\n{'path':<36} {'tokens/s':>10} {'ratio':>7} {'end-to-end s':>13}")
    for name, tps, wall in rows:
        print(f"{name:<36} {tps:>10.0f} {tps / plain:>7.2f} {'' if wall is None else f'{wall:.1f}':>13}")
    ray.shutdown()


if __name__ == "__main__":
    main()
