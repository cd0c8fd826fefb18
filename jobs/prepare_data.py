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

from eyas.config import parse_job_args  # noqa: E402
from eyas.data.config import DataJobConfig  # noqa: E402
from eyas.data.pipeline import UnreadableInputError, run_data_stage  # noqa: E402
from eyas.runtime import init_ray  # noqa: E402

CONFIG_CLASS = DataJobConfig
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "prepare_data.yaml")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(CONFIG_CLASS, "eyas data stage", DEFAULT_CONFIG, argv)
    init_ray(cfg.run)
    try:
        manifest = run_data_stage(cfg)
    except UnreadableInputError as exc:  # data.fail_on_unreadable: the manifest lists the files
        print(f"data stage failed: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    keys = ("counts", "files", "pii", "tokens", "timings", "outputs")
    print(json.dumps({k: manifest[k] for k in keys if k in manifest}, indent=2))
    return manifest


if __name__ == "__main__":
    main()
