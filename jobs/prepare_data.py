"""The data stage: prompts -> compliant, on-policy, tokenized chat data.

    python jobs/prepare_data.py                                   # embedded default (local Ray)
    ray job submit --working-dir . -- python jobs/prepare_data.py \\
        --config jobs/configs/prepare_data_llama31_8b.yaml run.output=s3://bucket/data
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

try:
    from eyas.config import parse_job_args  # noqa: E402
    from eyas.data.config import DataJobConfig  # noqa: E402
    from eyas.data.pipeline import UnreadableInputError, run_data_stage  # noqa: E402
    from eyas.runtime import cli, init_ray, job_summary, output_uri  # noqa: E402
except ModuleNotFoundError as exc:  # e.g. `ray start` run without the venv active
    raise SystemExit(f"error: {exc.name} is not installed for {sys.executable}: run the job with the "
                     "project's venv (and `ray start` with it active: README, Running jobs)") from None

CONFIG_CLASS = DataJobConfig
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "prepare_data.yaml")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(CONFIG_CLASS, "eyas data stage", DEFAULT_CONFIG, argv)
    output = output_uri(cfg.run)  # before Ray starts: a relative path in Ray's package copy is refused
    init_ray(cfg.run)
    try:
        manifest = run_data_stage(cfg)
    except UnreadableInputError as exc:  # data.fail_on_unreadable: the manifest lists the files
        print(f"data stage failed: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    keys = ("counts", "files", "pii", "tokens", "timings", "outputs")
    print(json.dumps(job_summary(manifest, keys, output), indent=2))
    return manifest


if __name__ == "__main__":
    cli(main)
