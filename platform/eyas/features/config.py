"""Configuration of the features stage (``jobs/extract_features.py``) and of online features.

The same ``FeaturesConfig`` serves two readers: the extract job (offline mode: run the target
once and write an artifact) and the trainer (``eyas.features.online.feature_dataset``: read
that artifact, or run the target live in online mode).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from eyas.config import RunConfig, StrictModel

DEFAULT_ARTIFACT = "artifacts/features"


class FeaturesConfig(StrictModel):
    """Target forward over a data artifact -> aux hidden states (3 layers) + final hidden state."""

    data: str = "artifacts/data"  # the data stage's artifact URI (local, s3://, gs://)
    artifact: str = DEFAULT_ARTIFACT  # the offline feature artifact (= the extract job's run.output)
    target: str = "assets:models/stories260k"  # must be the data stage's data.target
    allow_target_mismatch: bool = False  # accept a target other than the data manifest's config.target
    aux_layer_ids: list[int] | None = None  # layer OUTPUT indices; None = EAGLE-3's [1, N//2-1, N-4]
    encoding: Literal["bf16", "fp8"] = "bf16"  # see eyas.features.schema
    max_length: int = Field(default=2048, ge=2)  # tokens per feature row
    overflow: Literal["truncate", "split", "drop"] = "truncate"  # rows longer than max_length
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)  # held out by hash of the row id
    mode: Literal["offline", "online"] = "offline"
    batch_size: int = Field(default=8, ge=1)  # conversations per target forward
    num_actors: int = Field(default=1, ge=1)
    num_gpus_per_actor: float = Field(default=0.0, ge=0.0)
    num_cpus_per_actor: float = Field(default=1.0, gt=0.0)
    torch_threads: int | None = Field(default=None, ge=1)  # per actor; None: its CPUs rounded up
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    rows_per_shard: int = Field(default=256, ge=1)  # Parquet rows per file (offline)


class FeaturesJobConfig(StrictModel):
    """The extract job's whole configuration. ``run.output`` defaults to ``features.artifact``;
    both name the same artifact, so giving two different values is an error."""

    run: RunConfig
    features: FeaturesConfig = FeaturesConfig()

    @model_validator(mode="before")
    @classmethod
    def _output_defaults_to_artifact(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        features = data.get("features") or {}
        artifact = features.get("artifact", DEFAULT_ARTIFACT) if isinstance(features, dict) else DEFAULT_ARTIFACT
        run = dict(data.get("run") or {})
        run.setdefault("output", artifact)
        return {**data, "run": run}

    @model_validator(mode="after")
    def _one_output(self) -> FeaturesJobConfig:
        if self.run.output != self.features.artifact:
            raise ValueError(
                f"run.output={self.run.output!r} and features.artifact={self.features.artifact!r} "
                "name the same artifact but differ: set features.artifact (run.output follows it)")
        return self
