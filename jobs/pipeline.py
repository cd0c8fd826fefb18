"""The whole pipeline: data -> features -> train -> export -> evaluate -> serve -> load test -> report.

    python jobs/pipeline.py                      # embedded default: local Ray, stories260k, artifacts/
    python jobs/pipeline.py stages='[loadtest]'  # only some stages (finished ones are skipped anyway)
    RENV="{\\"env_vars\\": {\\"EYAS_HOME\\": \\"$PWD\\"}}"   # local cluster: outputs under ./artifacts
    ray job submit --working-dir . --runtime-env-json "$RENV" -- python jobs/pipeline.py \\
        --config jobs/configs/pipeline.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

try:
    from eyas.config import parse_job_args  # noqa: E402
    from eyas.pipeline import PipelineConfig, run_pipeline  # noqa: E402
    from eyas.runtime import cli, init_ray, output_uri  # noqa: E402
except ModuleNotFoundError as exc:  # e.g. `ray start` run without the venv active
    raise SystemExit(f"error: {exc.name} is not installed for {sys.executable}: run the job with the "
                     "project's venv (and `ray start` with it active: README, Running jobs)") from None

CONFIG_CLASS = PipelineConfig
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "pipeline.yaml")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(CONFIG_CLASS, "eyas pipeline", DEFAULT_CONFIG, argv)
    output = output_uri(cfg.run)  # the root of every stage's artifact; checked before Ray starts
    init_ray(cfg.run)
    report = run_pipeline(cfg)
    print(f"\nartifacts: {output} (data/, features/, train/draft/, evaluate/, loadtest/, report.json)")
    return report


if __name__ == "__main__":
    cli(main)
