"""Configuration of EAGLE-3 head training (``jobs/train_draft.py``).

The ``features`` section is the features stage's own ``FeaturesConfig``: offline mode reads its
``artifact`` (``<artifact>/train/*.parquet``), online mode asks ``eyas.features.online`` for a
live dataset. ``run.output`` receives the training artifact::

    <output>/vocab_mapping.safetensors    d2t / t2d used by every worker (and the export)
    <output>/checkpoints/<run_name>/...   Ray Train checkpoints (resume point)
    <output>/draft/                       the exported draft (config.json + model.safetensors)
    <output>/manifest.json                written last: steps, final acc_0..acc_k, tokens/s
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from eyas.config import RunConfig, StrictModel
from eyas.features.config import FeaturesConfig


class TrainConfig(StrictModel):
    """The head, the optimisation, the workers and the checkpoints."""

    target: str | None = None  # None: the features manifest's target (offline) or features.target
    init_from: str | None = None  # an exported draft dir to fine-tune: its weights AND vocab mapping
    draft_vocab_size: int = Field(default=32000, ge=1)  # clamped to the target vocab (identity then)
    ttt_length: int = Field(default=7, ge=1)  # unrolled steps; metrics acc_0 .. acc_{ttt_length-1}
    step_decay: float = Field(default=0.8, gt=0.0, le=1.0)  # loss weight decay**k of step k
    max_length: int = Field(default=2048, ge=4)  # tokens per row; longer rows are cut
    shuffle_buffer: int = Field(default=0, ge=0)  # rows shuffled locally per worker, seed + epoch (0 = file order)
    cache_data: bool = False  # materialize the train split in Ray's object store once (small data, many epochs)
    # optimisation
    batch_size: int = Field(default=4, ge=1)  # rows per micro-batch per worker
    grad_accum: int = Field(default=1, ge=1)  # micro-batches per optimizer step
    max_steps: int | None = Field(default=None, ge=1)  # optimizer steps; None = from num_epochs
    num_epochs: float = Field(default=1.0, gt=0.0)  # used when max_steps is None
    lr: float = Field(default=1e-4, gt=0.0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)  # cosine floor as a fraction of lr
    warmup_ratio: float = Field(default=0.015, ge=0.0, lt=1.0)  # linear warmup, fraction of steps
    weight_decay: float = Field(default=0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(default=0.5, gt=0.0)
    seed: int = 0
    # workers
    num_workers: int = Field(default=2, ge=0)  # 0 = Ray Train local mode (logic tests, one process)
    use_gpu: bool = False  # NCCL + one GPU per worker; CPU workers use gloo
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    torch_threads: int = Field(default=1, ge=1)  # intra-op threads per worker (1 is fastest on shared CPUs)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast (GPU); master weights stay fp32
    fsdp: bool = False  # shard the head with FSDP instead of DDP (GPU, large heads)
    # checkpoints and metrics
    run_name: str = "run"  # Ray Train run name: the same name resumes from its last checkpoint
    checkpoint_every: int = Field(default=50, ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=3, ge=-1)  # worker-group restarts (-1 = unlimited)
    metrics_window: int = Field(default=20, ge=1)  # steps averaged into the final acc_k
    # ray.train.report is a barrier and Ray Train V2 holds at most one unconsumed report per worker,
    # drained every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): reporting every step caps training at
    # ~1 step per 1-2 s. Each report carries the per-step metrics since the previous one; Ray metrics
    # (eyas_train_*) are published every step regardless.
    report_every: int = Field(default=10, ge=1)
    export_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    # <draft>/ngram_store.npz: contexts of 2..N tokens of the train split and their most frequent
    # next token, for the eyas engine's corpus branch (speculative.corpus_tokens); 0 = none.
    ngram_store_max_n: int = Field(default=6, ge=0)
    fault_injection_step: int | None = Field(default=None, ge=1)  # TEST HOOK: rank 0 exits once here

    @model_validator(mode="after")
    def _gpu_only_options(self) -> TrainConfig:
        if self.fsdp and not self.use_gpu:
            raise ValueError("train.fsdp=true needs train.use_gpu=true (FSDP is set up for NCCL); "
                             "use DDP (fsdp=false) on CPU workers")
        if self.num_workers == 0 and self.fault_injection_step is not None:
            raise ValueError("train.fault_injection_step needs real workers (num_workers >= 1): "
                             "local mode runs in the driver process and cannot be restarted")
        return self


class TrainJobConfig(StrictModel):
    """The training job's whole configuration."""

    run: RunConfig = RunConfig(output="artifacts/train")
    features: FeaturesConfig = FeaturesConfig()
    train: TrainConfig = TrainConfig()
