"""The load-test job (``jobs/load_test.py``): configuration, the run, and what it prints.

Without a ``tune:`` section the job sweeps ``loadtest.endpoints`` (the first is the baseline
every other endpoint is compared with) and writes a load-test artifact at ``run.output``. With
one, it tunes EAGLE-3 settings (``eyas.loadtest.tuning``) and writes a tuning artifact there.
Either way a rerun over a finished artifact with the same config measures nothing and prints
the stored results again; ``run.force=true`` measures anew.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import model_validator

from eyas import storage
from eyas.config import RunConfig, StrictModel, config_hash
from eyas.loadtest.config import LoadTestConfig
from eyas.loadtest.tuning import TuneConfig, format_recommendations, tuning_hash

DEFAULT_OUTPUT = "artifacts/loadtest"


class LoadTestJobConfig(StrictModel):
    """The load-test job's whole configuration. ``loadtest.output`` follows ``run.output``
    (default ``artifacts/loadtest``); both name the one artifact, so two values are an error."""

    run: RunConfig = RunConfig(output=DEFAULT_OUTPUT)
    loadtest: LoadTestConfig
    tune: TuneConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_output(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        run, loadtest = data.get("run") or {}, data.get("loadtest")
        if not isinstance(run, dict) or not isinstance(loadtest, dict):
            return data  # validation then names the section of the wrong type
        run, loadtest = dict(run), dict(loadtest)
        out_run, out_lt = run.get("output"), loadtest.get("output")
        if out_run is not None and out_lt is not None and out_run != out_lt:
            raise ValueError(f"run.output={out_run!r} and loadtest.output={out_lt!r} name the same "
                             "artifact but differ: set run.output only (loadtest.output follows it)")
        output = out_run or out_lt or DEFAULT_OUTPUT
        run["output"], loadtest["output"] = output, output
        return {**data, "run": run, "loadtest": loadtest}

    def artifact_hash(self) -> str:
        """The hash in the artifact's manifest: the load test's alone, or load test + tuning."""
        if self.tune is None:
            return config_hash(self.loadtest)
        return tuning_hash(self.loadtest, self.tune)


@dataclass
class JobOutcome:
    """What the job measured (or found already measured) and wrote."""

    ran: bool  # False: a finished artifact with the same config was there (no-op)
    rows: list[dict[str, Any]]
    files: dict[str, str]
    speedups: list[dict[str, Any]] = field(default_factory=list)
    recommendations: list[dict[str, Any]] | None = None
    settings: dict[str, dict[str, int]] = field(default_factory=dict)


def _ratio(a: Any, b: Any) -> float | None:
    ok = all(isinstance(v, int | float) and v == v for v in (a, b))  # v == v: not NaN
    return a / b if ok and b > 0 else None


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each endpoint against the first one measured at the same point: output throughput ratio,
    median TPOT ratio (first / this) and median TTFT ratio (first / this)."""
    first: dict[str, dict[str, Any]] = {}
    out = []
    for r in rows:
        base = first.setdefault(r["point"], r)
        if base is r:
            continue
        out.append({"point": r["point"], "endpoint": r["endpoint"], "baseline": base["endpoint"],
                    "throughput": _ratio(r["output_throughput"], base["output_throughput"]),
                    "tpot": _ratio(base["tpot_ms_median"], r["tpot_ms_median"]),
                    "ttft": _ratio(base["ttft_ms_median"], r["ttft_ms_median"])})
    return out


def stored_files(art: storage.Artifact) -> dict[str, str]:
    """name -> URI of the files a finished artifact's manifest lists."""
    files = {k: art.path(v) for k, v in art.manifest().get("files", {}).items()}
    return files | {"manifest": art.manifest_uri}


def stored_outcome(cfg: LoadTestJobConfig) -> JobOutcome:
    """The results of the finished artifact at ``run.output`` (nothing is measured)."""
    art = storage.Artifact(cfg.run.output)
    files = stored_files(art)
    if cfg.tune is None:
        rows = storage.read_json(files["summary_json"])["rows"]
        return JobOutcome(ran=False, rows=rows, files=files, speedups=speedups(rows))
    doc = storage.read_json(files["tuning"])
    return JobOutcome(ran=False, rows=doc["rows"], files=files, speedups=speedups(doc["rows"]),
                      recommendations=doc["recommendations"], settings=doc["settings"])


def measure(cfg: LoadTestJobConfig) -> JobOutcome:
    """Run the sweep (or the tuning) on the Ray cluster ``cfg.run`` names."""
    from eyas.loadtest.runner import run_load_test
    from eyas.loadtest.tuning import load_deployer, tune_settings
    from eyas.runtime import init_ray

    init_ray(cfg.run)
    if cfg.tune is None:
        res = run_load_test(cfg.loadtest)
        return JobOutcome(ran=True, rows=res.rows, files=res.files, speedups=speedups(res.rows))
    deployer = load_deployer(cfg.tune)
    res = tune_settings(cfg.loadtest, cfg.tune, deployer.deploy, deployer.teardown)
    return JobOutcome(ran=True, rows=res.rows, files=res.files, speedups=speedups(res.rows),
                      recommendations=res.recommendations, settings=res.settings)


def print_outcome(outcome: JobOutcome) -> None:
    """The comparison table (speedups over the first endpoint), the recommendations per band
    when tuning, and where every file is."""
    from eyas.loadtest.report import format_table
    from eyas.loadtest.runner import LoadTestResult

    if not outcome.ran:
        print("[eyas.loadtest] finished results with this config already exist: nothing measured "
              "(run.force=true measures again)")
    print(format_table(LoadTestResult(rows=outcome.rows, files=outcome.files)))
    if outcome.recommendations is not None:
        print("\nrecommended speculation setting per concurrency band:")
        print(format_recommendations(outcome.recommendations, outcome.settings))
    print("\nresults:")
    for name, uri in outcome.files.items():
        print(f"  {name}: {uri}")


def run_job(cfg: LoadTestJobConfig) -> JobOutcome:
    """Measure unless a finished artifact with the same config exists; print the results."""
    art = storage.Artifact(cfg.run.output)
    outcome = measure(cfg) if art.prepare(cfg.artifact_hash(), cfg.run.force) else stored_outcome(cfg)
    print_outcome(outcome)
    return outcome
