"""The whole pipeline: data -> features -> train -> export -> evaluate -> serve -> load test -> report.

    python jobs/pipeline.py                      # embedded default: local Ray, stories260k, artifacts/
    python jobs/pipeline.py stages='[loadtest]'  # only some stages (finished ones are skipped anyway)
    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

from eyas.config import parse_job_args  # noqa: E402
from eyas.pipeline import PipelineConfig, run_pipeline  # noqa: E402
from eyas.runtime import init_ray  # noqa: E402

CONFIG_CLASS = PipelineConfig
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "pipeline.yaml")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(CONFIG_CLASS, "eyas pipeline", DEFAULT_CONFIG, argv)
    init_ray(cfg.run)
    return run_pipeline(cfg)


if __name__ == "__main__":
    main()
