"""The features stage: data artifact -> target forward -> aux + final hidden states per token.

    python jobs/extract_features.py                               # embedded default (local Ray, CPU)
    ray job submit --working-dir . -- python jobs/extract_features.py \\
        --config jobs/configs/extract_features_llama31_8b.yaml features.artifact=s3://bucket/features
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

try:
    from eyas.config import parse_job_args  # noqa: E402
    from eyas.features.config import FeaturesJobConfig  # noqa: E402
    from eyas.features.stage import run_features_stage  # noqa: E402
    from eyas.runtime import cli, init_ray, job_summary, output_uri  # noqa: E402
except ModuleNotFoundError as exc:  # e.g. `ray start` run without the venv active
    raise SystemExit(f"error: {exc.name} is not installed for {sys.executable}: run the job with the "
                     "project's venv (and `ray start` with it active: README, Running jobs)") from None

CONFIG_CLASS = FeaturesJobConfig
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "extract_features.yaml")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(CONFIG_CLASS, "eyas features stage", DEFAULT_CONFIG, argv)
    output = output_uri(cfg.run)  # = features.artifact; checked before Ray starts
    init_ray(cfg.run)
    manifest = run_features_stage(cfg)
    keys = ("counts", "tokens", "target", "bytes_per_token", "timings", "outputs")
    print(json.dumps(job_summary(manifest, keys, output), indent=2))
    return manifest


if __name__ == "__main__":
    cli(main)
