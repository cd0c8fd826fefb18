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

from eyas.config import parse_job_args  # noqa: E402
from eyas.features.config import FeaturesJobConfig  # noqa: E402
from eyas.features.stage import run_features_stage  # noqa: E402
from eyas.runtime import init_ray  # noqa: E402

CONFIG_CLASS = FeaturesJobConfig
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "extract_features.yaml")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(CONFIG_CLASS, "eyas features stage", DEFAULT_CONFIG, argv)
    init_ray(cfg.run)
    manifest = run_features_stage(cfg)
    print(json.dumps({k: manifest[k] for k in ("counts", "tokens", "target", "bytes_per_token", "timings",
                                               "outputs")}, indent=2))
    return manifest


if __name__ == "__main__":
    main()
