"""The whole path in one job: data -> features -> train (+export) -> evaluate -> serve -> load test.

Each stage goes through the same library call as its own job, with its artifact under
``run.output`` (``data/``, ``features/``, ``train/`` with ``train/draft``, ``evaluate/``,
``loadtest/``); a stage whose artifact is complete for its config is skipped. The serve stage
starts the baseline and EAGLE-3 apps on a local Serve instance, the load test sweeps both, and
the apps are deleted afterwards. ``report.json`` gathers the headline numbers.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, model_validator

from eyas import storage
from eyas.config import RunConfig, StrictModel
from eyas.data.config import DataConfig, DataJobConfig
from eyas.evaluate.config import EvaluateConfig, EvaluateJobConfig
from eyas.features.config import FeaturesConfig, FeaturesJobConfig
from eyas.loadtest.config import LoadTestConfig
from eyas.loadtest.job import LoadTestJobConfig
from eyas.serve.config import ServeConfig
from eyas.train.config import TrainConfig, TrainJobConfig

Stage = Literal["data", "features", "train", "evaluate", "loadtest"]
STAGES: list[Stage] = ["data", "features", "train", "evaluate", "loadtest"]


class ServeStageConfig(StrictModel):
    """The two apps the load test compares; the EAGLE-3 app's draft is the training output."""

    host: str = "127.0.0.1"
    port: int = 8000
    baseline: ServeConfig = ServeConfig(model="assets:models/stories260k", served_model_name="stories260k")
    eagle3: ServeConfig = ServeConfig(model="assets:models/stories260k", served_model_name="stories260k",
                                      speculative={"draft_path": "<train>/draft"})


class PipelineConfig(StrictModel):
    """The pipeline job's whole configuration; ``run.output`` is the root of every artifact."""

    run: RunConfig = RunConfig(output="artifacts")
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES))
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    serve: ServeStageConfig = ServeStageConfig()
    loadtest: LoadTestConfig

    @model_validator(mode="before")
    @classmethod
    def _loadtest_output(cls, data: Any) -> Any:
        """The load test writes under ``run.output`` like every stage (not set by the user)."""
        if isinstance(data, dict) and isinstance(data.get("loadtest"), dict):
            if "output" in data["loadtest"]:
                raise ValueError("loadtest.output is set by the pipeline (<run.output>/loadtest): remove it")
            root = (data.get("run") or {}).get("output", "artifacts")
            data = {**data, "loadtest": {**data["loadtest"], "output": storage.join(root, "loadtest")}}
        return data


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Each stage's job config, its inputs and outputs wired under ``run.output``."""
    root, force = cfg.run.output, cfg.run.force

    def run(name: str) -> RunConfig:
        return cfg.run.model_copy(update={"output": storage.join(root, name), "force": force})

    features = cfg.features.model_copy(update={"data": storage.join(root, "data"),
                                               "artifact": storage.join(root, "features")})
    evaluate = cfg.evaluate.model_copy(update={"draft": storage.join(root, "train", "draft")})
    return {
        "data": DataJobConfig(run=run("data"), data=cfg.data),
        "features": FeaturesJobConfig(run=run("features"), features=features),
        "train": TrainJobConfig(run=run("train"), features=features, train=cfg.train),
        "evaluate": EvaluateJobConfig(run=run("evaluate"), features=features, evaluate=evaluate),
        "loadtest": LoadTestJobConfig(run=run("loadtest"), loadtest=cfg.loadtest),
    }


def serve_apps(cfg: PipelineConfig) -> dict[str, ServeConfig]:
    """The baseline and EAGLE-3 app configs, the latter pointing at this run's exported draft."""
    spec = cfg.serve.eagle3.speculative
    draft = storage.join(cfg.run.output, "train", "draft")
    if spec is None:
        raise ValueError("serve.eagle3.speculative is not set: the EAGLE-3 app needs a draft")
    eagle3 = cfg.serve.eagle3.model_copy(update={"speculative": spec.model_copy(
        update={"draft_path": draft if spec.draft_path == "<train>/draft" else spec.draft_path})})
    return {"baseline": cfg.serve.baseline, "eagle3": eagle3}


def start_serve(cfg: PipelineConfig) -> list[str]:
    """Run both apps on a local Serve instance at /baseline and /eagle3; return their names.
    No per-request access log lines: the load test records every request itself."""
    from ray import serve

    from eyas.serve.app import build_app

    quiet = {"enable_access_log": False}
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=quiet)
    names = []
    for name, app in serve_apps(cfg).items():
        serve.run(build_app(app.model_dump(mode="json")), name=f"pipeline-{name}", route_prefix=f"/{name}",
                  logging_config=quiet)
        names.append(f"pipeline-{name}")
    return names


def stop_serve(names: list[str]) -> None:
    from ray import serve

    for name in names:
        serve.delete(name)


def run_stage(name: str, job: Any) -> dict[str, Any]:
    """One stage through its own library entry; returns its manifest (or load-test outcome)."""
    start = time.perf_counter()
    print(f"\n=== stage {name} ===", flush=True)
    if name == "data":
        from eyas.data.pipeline import run_data_stage as fn
    elif name == "features":
        from eyas.features.stage import run_features_stage as fn
    elif name == "train":
        from eyas.train.trainer import run_training as fn
    elif name == "evaluate":
        from eyas.evaluate.runner import run_evaluation as fn
    else:
        from eyas.loadtest.job import run_job

        out = run_job(job)
        return {"rows": out.rows, "files": out.files, "speedups": out.speedups,
                "seconds": time.perf_counter() - start}
    manifest = fn(job)
    return {**manifest, "seconds": time.perf_counter() - start}


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the selected stages in order, serving the apps around the load test."""
    from eyas.pipeline_report import build_report, print_report

    jobs, results = stage_configs(cfg), {}
    for name in STAGES:
        if name not in cfg.stages:
            continue
        if name != "loadtest":
            results[name] = run_stage(name, jobs[name])
            continue
        apps = start_serve(cfg)
        try:
            results[name] = run_stage(name, jobs[name])
        finally:
            stop_serve(apps)
    report = build_report(results)
    storage.write_json(storage.join(cfg.run.output, "report.json"), report)
    print_report(report, storage.join(cfg.run.output, "report.json"))
    return report
