"""The load test: a concurrency sweep, baseline vs EAGLE-3 (TTFT / TPOT / ITL / throughput, plots),
or, with a ``tune:`` section, the best EAGLE-3 setting per concurrency band.

    python jobs/load_test.py                                      # the local serve apps (stories260k)
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/load_test.py \\
        --config jobs/configs/load_test_llama31_8b.yaml run.output=s3://bucket/eyas/loadtest/llama31-8b
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # run from a checkout

try:
    from eyas import storage  # noqa: E402
    from eyas.config import parse_job_args  # noqa: E402
    from eyas.loadtest.job import JobOutcome, LoadTestJobConfig, run_job  # noqa: E402
    from eyas.runtime import cli, output_uri  # noqa: E402
except ModuleNotFoundError as exc:  # e.g. `ray start` run without the venv active
    raise SystemExit(f"error: {exc.name} is not installed for {sys.executable}: run the job with the "
                     "project's venv (and `ray start` with it active: README, Running jobs)") from None

CONFIG_CLASS = LoadTestJobConfig
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "load_test.yaml")


def main(argv: list[str] | None = None) -> JobOutcome:
    cfg = parse_job_args(CONFIG_CLASS, "eyas load test", DEFAULT_CONFIG, argv)
    output = output_uri(cfg.run)  # checked before any request is sent
    outcome = run_job(cfg)
    print(f"\nartifact: {output}")
    for name, uri in outcome.files.items():
        if storage.is_relative_local(uri):
            print(f"  {name}: {storage.absolute_uri(uri)}")
    return outcome


if __name__ == "__main__":
    cli(main)
