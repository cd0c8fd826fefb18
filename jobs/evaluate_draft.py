"""Offline acceptance: the trained head vs n-gram prompt lookup on the held-out features.

    python jobs/evaluate_draft.py                                 # embedded default (artifacts/train/draft)
    ray job submit --working-dir . -- python jobs/evaluate_draft.py \\
        --config jobs/configs/evaluate_draft_llama31_8b.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

try:
    from eyas.config import parse_job_args  # noqa: E402
    from eyas.evaluate.config import EvaluateJobConfig  # noqa: E402
    from eyas.evaluate.runner import run_evaluation  # noqa: E402
    from eyas.runtime import cli, init_ray, job_summary, output_uri  # noqa: E402
except ModuleNotFoundError as exc:  # e.g. `ray start` run without the venv active
    raise SystemExit(f"error: {exc.name} is not installed for {sys.executable}: run the job with the "
                     "project's venv (and `ray start` with it active: README, Running jobs)") from None

CONFIG_CLASS = EvaluateJobConfig
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "evaluate_draft.yaml")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(CONFIG_CLASS, "eyas offline acceptance", DEFAULT_CONFIG, argv)
    output = output_uri(cfg.run)  # checked before Ray starts
    init_ray(cfg.run)
    manifest = run_evaluation(cfg)
    print(json.dumps(job_summary(manifest, ("counts", "tau", "ttt_acc", "outputs"), output), indent=2))
    return manifest


if __name__ == "__main__":
    cli(main)
