"""Configuration of offline acceptance evaluation (``jobs/evaluate_draft.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from eyas.config import RunConfig, StrictModel
from eyas.features.config import FeaturesConfig


class EvaluateConfig(StrictModel):
    """Which draft, on which split, how deep, and the n-gram baseline's settings."""

    draft: str = "artifacts/train/draft"  # an exported draft directory (local, s3://, gs://)
    target: str | None = None  # None: the features manifest's target
    split: Literal["train", "eval"] = "eval"
    max_depth: int = Field(default=7, ge=1)  # chains of depth 1 .. max_depth are scored
    ngram_min: int = Field(default=1, ge=1)
    ngram_max: int = Field(default=3, ge=1)
    max_length: int = Field(default=2048, ge=4)
    max_rows: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    num_actors: int = Field(default=1, ge=1)
    num_cpus_per_actor: float = Field(default=1.0, gt=0.0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0.0)
    torch_threads: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _ngram_range(self) -> EvaluateConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"evaluate.ngram_min={self.ngram_min} > ngram_max={self.ngram_max}")
        return self


class EvaluateJobConfig(StrictModel):
    """The evaluation job's whole configuration."""

    run: RunConfig = RunConfig(output="artifacts/evaluate")
    features: FeaturesConfig = FeaturesConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
