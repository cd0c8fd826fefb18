"""Rows/s of validate + PII + chat template + tokenize: Ray Data vs a plain single-process loop.

Both run the same step classes over the same rows (the dataset's own replies, no regeneration),
in one run, set-up included on both sides; the ratio is Ray Data's rows/s over the loop's (the
baseline). On one 2-core machine the pools cannot beat the loop (they share its cores and add
actor start-up and object transfers); the point of the pools is that they scale out with nodes.

    .venv/bin/python bench/data_throughput.py [--rows 2000] [--actors 2] [--target DIR]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import ray.data  # noqa: E402

from eyas.assets import resolve_asset  # noqa: E402
from eyas.data.config import DataConfig  # noqa: E402
from eyas.data.normalize import normalize_record, parse_file  # noqa: E402
from eyas.data.stages import PiiScrubber, Templater, Validator, to_table  # noqa: E402


def load_rows(path: str, n: int) -> list[dict]:
    with open(path, "rb") as f:
        records = parse_file(f.read(), path)
    records = (records * (n // len(records) + 1))[:n]
    return [normalize_record(r, "bench", i) for i, r in enumerate(records)]


def plain_loop(rows: list[dict], cfg: DataConfig, batch: int) -> float:
    """The baseline: the same steps, one process, one batch after another. Returns seconds,
    set-up (tokenizer, detector) included as it is for the actor pools."""
    start = time.perf_counter()
    steps = [Validator(cfg), PiiScrubber(cfg), Templater(cfg)]
    for i in range(0, len(rows), batch):
        table = to_table(rows[i:i + batch])
        for step in steps:
            table = step(table)
    return time.perf_counter() - start


def ray_data(rows: list[dict], cfg: DataConfig, actors: int) -> float:
    """The same steps as Ray Data actor pools. Returns seconds (pool start-up included)."""
    blocks = [to_table(rows[i:i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]
    ds = ray.data.from_arrow(blocks)
    args = {"batch_size": cfg.batch_size, "batch_format": "pyarrow", "fn_constructor_args": (cfg,),
            "num_cpus": 0.25}  # 3 pools share the cores; CPU counts are only for scheduling
    for step in (Validator, PiiScrubber, Templater):
        ds = ds.map_batches(step, compute=ray.data.ActorPoolStrategy(size=actors), **args)
    start = time.perf_counter()
    n = ds.materialize().count()
    assert n == len(rows), f"Ray Data returned {n} rows of {len(rows)}"
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--target", default="assets:models/stories260k")
    parser.add_argument("--data", default="assets:datasets/sft/llamafactory_alpaca_en_demo.json")
    args = parser.parse_args()
    cfg = DataConfig(target=args.target, max_length=4096, batch_size=args.batch,
                     generation={"mode": "keep"})
    rows = load_rows(resolve_asset(args.data, "--data"), args.rows)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = plain_loop(rows, cfg, args.batch)
    dist = ray_data(rows, cfg, args.actors)
    print(f"rows: {len(rows)}  target: {args.target}  cores: {os.cpu_count()}  actors per step: {args.actors}")
    print(f"plain single-process loop (baseline): {len(rows) / base:8.1f} rows/s  ({base:.2f} s)")
    print(f"Ray Data actor pools:                 {len(rows) / dist:8.1f} rows/s  ({dist:.2f} s)")
    print(f"ratio Ray Data / baseline:            {base / dist:8.2f}x")


if __name__ == "__main__":
    main()
