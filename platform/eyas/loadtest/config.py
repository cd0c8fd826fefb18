"""Configuration of a load test: which endpoints, which load points, which prompts, which SLOs.

A load test sweeps *points*: first every closed-loop concurrency in ``concurrencies`` (exactly C
requests in flight), then every open-loop Poisson rate in ``request_rates`` (requests/s). At
each point every endpoint is measured in turn, in the order given, with the same prompts in the
same order (and, for rates, the same seeded arrival schedule), so the first endpoint is the
baseline the others are compared with.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from eyas.config import StrictModel


class EndpointConfig(StrictModel):
    """One OpenAI-compatible server to measure."""

    name: str = Field(min_length=1, description="label in tables and plots, e.g. baseline, eagle3")
    url: str = Field(description="base URL: http://host:8000 or http://host:8000/v1; the host "
                     "{serve_proxy} is replaced at run time by a node that runs a Ray Serve "
                     "proxy (the Serve controller's node, the head), as the client actors see it")
    model: str = Field(description="the `model` field sent with every request")
    api_key_env: str | None = Field(
        default=None, description="name of the environment variable holding the bearer token")
    api_key_file: str | None = Field(
        default=None, description="a file holding the bearer token, read by the load-test driver "
        "(e.g. the serve app's own api_key_file, mounted on every node by cluster.yaml)")

    @model_validator(mode="after")
    def _one_key_source(self) -> EndpointConfig:
        if self.api_key_env and self.api_key_file:
            raise ValueError(f"endpoint {self.name}: set api_key_env or api_key_file, not both")
        return self


# The keys each workload kind reads, besides kind, num_prompts, output_len and chat.
KIND_KEYS: dict[str, set[str]] = {
    "synthetic": {"input_len"},
    "shared_prefix": {"input_len", "prefix_len"},
    "prompts_file": {"path"},
    "random": {"input_len", "range_ratio", "tokenizer"},
    "sharegpt": {"path", "tokenizer", "context_len"},
}


class WorkloadConfig(StrictModel):
    """Where prompts come from, and how long requests are.

    ``synthetic`` and ``shared_prefix`` count ``input_len``/``prefix_len`` in pseudo-*words*
    (no tokenizer needed; a word is one to two tokens). ``random`` and ``sharegpt`` count
    *tokens* of the served model's tokenizer, as SGLang's ``bench_serving`` does, and fix each
    request's output length (``max_tokens`` with ``ignore_eos``), so their numbers can be set
    next to published ones.
    """

    kind: Literal["synthetic", "shared_prefix", "prompts_file", "random", "sharegpt"] = "synthetic"
    path: str | None = Field(
        default=None, description="prompts_file: .jsonl/.json/.parquet with prompt|text|messages; "
        "sharegpt: .json/.jsonl of {conversations: [{from: human|gpt, value}]}")
    input_len: int = Field(default=128, ge=1, description="synthetic/shared_prefix: words per "
                           "prompt; random: prompt tokens (upper end of the range)")
    prefix_len: int = Field(default=0, ge=0, description="shared_prefix: words shared by all")
    output_len: int | None = Field(
        default=None, ge=1, description="max_tokens per request, overriding the top-level "
        "max_tokens; random: output tokens (upper end of the range, default max_tokens); "
        "sharegpt: a fixed output length instead of each reply's")
    range_ratio: float = Field(
        default=0.0, ge=0, le=1, description="random: lengths are drawn uniformly from "
        "[range_ratio * len, len] (bench_serving --random-range-ratio; 1: fixed lengths)")
    tokenizer: str | None = Field(
        default=None, description="random/sharegpt: tokenizer directory, asset or registered "
        "target; default: the first endpoint's model, where eyas.targets finds it locally")
    context_len: int | None = Field(
        default=None, ge=2, description="sharegpt: skip conversations whose prompt + output "
        "tokens exceed this (bench_serving --sharegpt-context-len)")
    num_prompts: int = Field(default=256, ge=1, description="prompts generated or read (at most)")
    chat: bool = Field(default=True, description="/v1/chat/completions (true) or /v1/completions")

    @model_validator(mode="after")
    def _check_kind(self) -> WorkloadConfig:
        if self.kind in ("prompts_file", "sharegpt") and not self.path:
            raise ValueError(f"workload.kind={self.kind} needs workload.path (a local path, "
                             "assets:... or a URI)")
        if self.kind == "shared_prefix" and self.prefix_len < 1:
            raise ValueError("workload.kind=shared_prefix needs workload.prefix_len >= 1")
        unused = self.unused_keys()
        if unused:
            keys = ", ".join(f"workload.{k}" for k in unused)
            raise ValueError(f"workload.kind={self.kind} does not read {keys}: remove "
                             f"{'it' if len(unused) == 1 else 'them'} or change workload.kind")
        return self

    def unused_keys(self) -> list[str]:
        """Keys set away from their defaults that this kind does not read (a value that would be
        silently ignored is a mistake). Compared with defaults, not with the keys given, so a
        dumped and re-validated config passes."""
        fields = type(self).model_fields
        other = set().union(*KIND_KEYS.values()) - KIND_KEYS[self.kind]
        return sorted(k for k in other if getattr(self, k) != fields[k].default)


class SLOConfig(StrictModel):
    """Service-level objectives for goodput; an unset bound always passes."""

    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)


class LoadTestConfig(StrictModel):
    """A whole sweep: endpoints x (concurrencies + request_rates)."""

    endpoints: list[EndpointConfig] = Field(min_length=1)
    concurrencies: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    request_rates: list[float] = Field(default_factory=list, description="Poisson, requests/s")
    requests_per_point: int | None = Field(default=128, ge=1)
    duration_s: float | None = Field(
        default=None, gt=0, description="stop issuing after this long (with requests_per_point: "
        "whichever comes first); requests in flight at the deadline still finish and count")
    warmup_requests: int | None = Field(
        default=None, ge=0, description="per endpoint and point, never counted; None: one per "
        "lane (= C) at closed-loop points, 8 at rate points")
    ramp_up_s: float = Field(
        default=0.0, ge=0, description="closed loop: lane starts spread evenly over this long "
        "(0: all start together, as SGLang's bench_serving does)")
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    seed: int = 0
    ignore_eos: bool = Field(default=False, description="send ignore_eos (SGLang/vLLM only)")
    continuous_usage_stats: bool = Field(
        default=False, description="ask for usage in every chunk (vLLM/SGLang stream_options "
        "extension): exact tokens per chunk for ITL")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="merged into each body")
    request_timeout_s: float = Field(default=600.0, gt=0)
    slo: SLOConfig = Field(default_factory=SLOConfig)
    output: str = Field(description="result directory: a local path, s3:// or gs://")
    num_client_actors: int = Field(default=2, ge=1, description="Ray actors generating load")
    client_actor_cpus: float = Field(default=1.0, ge=0)
    progress: bool = True

    @model_validator(mode="after")
    def _check_points(self) -> LoadTestConfig:
        if not self.concurrencies and not self.request_rates:
            raise ValueError("set concurrencies and/or request_rates: there is no load point")
        if any(c < 1 for c in self.concurrencies):
            raise ValueError(f"concurrencies must all be >= 1, got {self.concurrencies}")
        if any(r <= 0 for r in self.request_rates):
            raise ValueError(f"request_rates must all be > 0 (requests/s), got {self.request_rates}")
        if self.requests_per_point is None and self.duration_s is None:
            raise ValueError("set requests_per_point and/or duration_s: a point would never end")
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"endpoint names must be unique, got {names}")
        return self

    @property
    def request_max_tokens(self) -> int:
        """max_tokens sent with every request (the workload's output_len wins when set)."""
        return self.workload.output_len or self.max_tokens
