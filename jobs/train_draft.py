"""The training stage: EAGLE-3 head on target features with Ray Train, then export.

Exports at the end of training (no separate export job): the final checkpoint becomes
``<run.output>/draft`` (config.json + model.safetensors, copied to object storage when remote),
checked against the target before the manifest is written.

    python jobs/train_draft.py                                    # embedded default (local Ray, 2 CPUs)
    python jobs/train_draft.py train.max_steps=50 train.num_workers=1
    ray job submit --working-dir . -- python jobs/train_draft.py \\
        --config jobs/configs/train_draft_llama31_8b.yaml run.output=s3://bucket/eyas/train

Rerunning with the same run.output and train.run_name resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

try:
    from eyas.config import parse_job_args  # noqa: E402
    from eyas.runtime import cli, init_ray, job_summary, output_uri  # noqa: E402
    from eyas.train.config import TrainJobConfig  # noqa: E402
    from eyas.train.trainer import run_training  # noqa: E402
except ModuleNotFoundError as exc:  # e.g. `ray start` run without the venv active
    raise SystemExit(f"error: {exc.name} is not installed for {sys.executable}: run the job with the "
                     "project's venv (and `ray start` with it active: README, Running jobs)") from None

CONFIG_CLASS = TrainJobConfig
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "train_draft.yaml")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(CONFIG_CLASS, "eyas training stage", DEFAULT_CONFIG, argv)
    output = output_uri(cfg.run)  # checked before Ray starts
    init_ray(cfg.run)
    manifest = run_training(cfg)
    keys = ("steps", "final", "tokens_per_s", "vocab", "resumed_at", "outputs", "timings")
    print(json.dumps(job_summary(manifest, keys, output), indent=2))
    return manifest


if __name__ == "__main__":
    cli(main)
