"""The serve app's configuration: the ``args`` of a ``serve run``/``serve deploy`` YAML entry.

One ``ServeConfig`` describes one OpenAI-compatible model endpoint: which target model, which
backend runs it (the eyas engine on CPU/GPU, or SGLang on GPUs), optional EAGLE-3 speculation,
request limits and timeouts, optional API-key auth (from a file or the node's environment, never
from ``runtime_env``, which Ray writes to its logs and shows on its dashboard), and how Ray Serve
places and autoscales the replicas.
Validation happens in the builder (``eyas.serve.app.build_app``) on the driver, so a wrong key
or value fails before any replica starts. Paths are resolved later, on the replica.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from eyas.config import StrictModel

DTYPES = ("float32", "bfloat16", "float16")


class SpeculativeConfig(StrictModel):
    """EAGLE-3 speculative decoding, with SGLang's knob names.

    ``num_steps`` S, ``eagle_topk`` K and ``num_draft_tokens`` D are set all three or none
    (none: the backend's defaults, 3/1/4 for the eyas engine; SGLang picks its own).
    """

    algorithm: Literal["EAGLE3"] = "EAGLE3"
    draft_path: str  # exported draft dir: local path, assets:..., s3://, gs:// (or a hub id, SGLang)
    num_steps: int | None = Field(None, ge=1)
    eagle_topk: int | None = Field(None, ge=1)
    num_draft_tokens: int | None = Field(None, ge=2)
    # SGLang only: false passes disable_overlap_schedule=True (0.5.23 runs EAGLE3 on its v2
    # worker either way and reads no environment variable for it)
    overlap_scheduler: bool = False
    # eyas engine only: an n-gram lookup branch of up to this many tokens verified with the tree,
    # a corpus branch from the draft dir's ngram_store.npz (the training replies), and plain
    # decoding for rounds of more than max_speculative_batch requests (None: never)
    ngram_tokens: int = Field(0, ge=0)
    corpus_tokens: int = Field(0, ge=0)
    max_speculative_batch: int | None = Field(None, ge=1)
    # eyas engine only: "adaptive" picks each round's setting (plain, chains of depth 1..S, the
    # configured tree) from measured costs and acceptance (eyas.engine.policy), after a short
    # timing warm-up when the replica starts; "fixed" runs the configured tree every round
    speculation: Literal["fixed", "adaptive"] = "fixed"

    @model_validator(mode="after")
    def _knobs(self) -> SpeculativeConfig:
        knobs = (self.num_steps, self.eagle_topk, self.num_draft_tokens)
        if any(k is None for k in knobs) and any(k is not None for k in knobs):
            raise ValueError("speculative.num_steps, eagle_topk and num_draft_tokens: set all "
                             "three or none (e.g. 3/1/4, 5/1/6, 7/1/8, or a tree 5/4/8)")
        if self.num_steps is not None:
            from eyas.engine.tree import validate_tree_knobs

            validate_tree_knobs(self.num_steps, self.eagle_topk, self.num_draft_tokens)
        if self.overlap_scheduler and self.eagle_topk not in (None, 1):
            raise ValueError(f"speculative.overlap_scheduler needs eagle_topk=1 (chain drafting), "
                             f"got {self.eagle_topk}; set eagle_topk: 1 or turn it off")
        return self

    @property
    def knobs_set(self) -> bool:
        """Whether S/K/D were given (else the backend's defaults apply)."""
        return self.num_steps is not None


class EyasEngineConfig(StrictModel):
    """The project's own engine (``eyas.engine.Engine``)."""

    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch_size: int = Field(16, ge=1)  # KV slots = requests decoded together
    max_seq_len: int | None = Field(None, ge=2)  # None: the model's max_position_embeddings
    num_threads: int | None = Field(1, ge=1)  # torch intra-op threads per replica (None: torch's)


class SGLangConfig(StrictModel):
    """``sglang.Engine`` settings (its ServerArgs names); GPU nodes only."""

    tp_size: int = Field(1, ge=1)
    dtype: str = "auto"
    context_length: int | None = Field(None, ge=2)
    mem_fraction_static: float | None = Field(None, gt=0, lt=1)
    max_running_requests: int | None = Field(None, ge=1)
    enable_metrics: bool = True  # SGLang's own Prometheus metrics (sglang:spec_accept_length)
    log_level: str = "error"
    extra_args: dict[str, Any] = Field(default_factory=dict)  # more ServerArgs, passed verbatim


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling on ongoing (queued + running) requests per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float | None = Field(None, ge=0)
    downscale_delay_s: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas={self.min_replicas} exceeds "
                             f"max_replicas={self.max_replicas}")
        init = self.initial_replicas
        if init is not None and not self.min_replicas <= init <= self.max_replicas:
            raise ValueError(f"autoscaling.initial_replicas={init} is outside "
                             f"[{self.min_replicas}, {self.max_replicas}]")
        return self


class ActorOptions(StrictModel):
    """Ray resources of one replica (Serve's ``ray_actor_options``)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0)  # bytes
    accelerator_type: str | None = None  # e.g. "H200"
    resources: dict[str, float] = Field(default_factory=dict)
    runtime_env: dict[str, Any] | None = None  # never secrets: Ray logs and shows it


class DeploymentConfig(StrictModel):
    """How Serve runs the replicas: a fixed count or autoscaling, and their resources."""

    name: str = "EyasOpenAI"
    num_replicas: int | None = Field(None, ge=1)  # fixed count; exclusive with autoscaling
    autoscaling: AutoscalingConfig | None = None
    # Generation requests one replica runs at once (engine slots + its own waiting list); the
    # next ServeConfig.max_queued_requests wait in the replica, the rest get 503 + Retry-After.
    # Serve's own per-replica limit is set above it (eyas.serve.app) so that /health and requests
    # still uploading their bodies never wait behind generation.
    max_ongoing_requests: int = Field(64, ge=1)
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)

    @model_validator(mode="after")
    def _scaling(self) -> DeploymentConfig:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("deployment: set num_replicas (fixed) or autoscaling, not both")
        return self


class ServeConfig(StrictModel):
    """One OpenAI-compatible model endpoint (the builder's ``args``)."""

    model: str  # target: local HF dir, assets:models/..., or a hub id (SGLang)
    served_model_name: str | None = None  # the API's model id; default: the model path's name
    tokenizer: str | None = None  # default: the model's own (its chat template is used)
    backend: Literal["eyas", "sglang"] = "eyas"
    engine: EyasEngineConfig = Field(default_factory=EyasEngineConfig)
    sglang: SGLangConfig = Field(default_factory=SGLangConfig)
    speculative: SpeculativeConfig | None = None
    # The API key (unset: no auth): a file mounted on the nodes, or a variable of the node's own
    # environment (`ray start` inherits it). Never runtime_env.env_vars: see the module doc.
    api_key_file: str | None = None
    api_key_env: str | None = None
    default_max_tokens: int = Field(256, ge=1)  # when a request gives none (capped by context)
    max_tokens_limit: int = Field(4096, ge=1)  # larger requests get 400
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # larger bodies get 413
    # Prompt characters checked before tokenizing (400 context_length_exceeded above it);
    # None: 32 per token of the model's context (no real text is that dense).
    max_prompt_chars: int | None = Field(None, ge=1)
    body_timeout_s: float = Field(30.0, gt=0)  # the whole body must arrive within it (else 408)
    request_timeout_s: float = Field(600.0, gt=0)  # a request running longer is ended (504)
    max_queued_requests: int = Field(64, ge=0)  # see DeploymentConfig.max_ongoing_requests
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)

    @model_validator(mode="after")
    def _api_key_source(self) -> ServeConfig:
        if self.api_key_file and self.api_key_env:
            raise ValueError("set api_key_file or api_key_env, not both")
        env_vars = (self.deployment.ray_actor_options.runtime_env or {}).get("env_vars") or {}
        if self.api_key_env and self.api_key_env in env_vars:
            raise ValueError(
                f"deployment.ray_actor_options.runtime_env.env_vars sets {self.api_key_env} "
                "(api_key_env): Ray writes runtime_env to its logs, `serve config` and the "
                "dashboard API in plain text. Put the key in a file on the nodes and set "
                "api_key_file, or export it in the nodes' environment before `ray start`")
        return self

    @model_validator(mode="after")
    def _placement(self) -> ServeConfig:
        gpus = self.deployment.ray_actor_options.num_gpus
        if self.backend == "sglang" and gpus < self.sglang.tp_size:
            raise ValueError(f"backend sglang with sglang.tp_size={self.sglang.tp_size} needs "
                             f"deployment.ray_actor_options.num_gpus >= {self.sglang.tp_size} "
                             f"(got {gpus})")
        if self.backend == "eyas" and self.engine.device.startswith("cuda") and gpus <= 0:
            raise ValueError(f"engine.device={self.engine.device!r} needs a GPU: set "
                             "deployment.ray_actor_options.num_gpus (e.g. 1)")
        spec = self.speculative
        if self.backend == "eyas" and spec is not None and spec.overlap_scheduler:
            raise ValueError("speculative.overlap_scheduler is an SGLang option; the eyas "
                             "engine has no overlap scheduler: remove it or use backend sglang")
        if self.backend == "sglang" and spec is not None and (
                spec.ngram_tokens or spec.corpus_tokens or spec.max_speculative_batch is not None):
            raise ValueError("speculative.ngram_tokens, corpus_tokens and max_speculative_batch are "
                             "eyas engine options (n-gram branches verified with the EAGLE-3 tree; "
                             "plain decoding above a batch size); SGLang's EAGLE3 has none of them: "
                             "remove them")
        if self.backend == "sglang" and spec is not None and spec.speculation == "adaptive":
            raise ValueError("speculative.speculation: adaptive is an eyas engine option; "
                             "SGLang runs one static num_steps/eagle_topk/num_draft_tokens per "
                             "server and cannot change it per round: set speculation: fixed (or "
                             "remove it) and pick the setting per load band (the tuning job's "
                             "recommendation), or use backend eyas")
        return self

    @property
    def model_name(self) -> str:
        """The id clients pass as ``model`` (and see in ``/v1/models``)."""
        if self.served_model_name:
            return self.served_model_name
        return self.model.rstrip("/").rsplit("/", 1)[-1].removeprefix("assets:")
