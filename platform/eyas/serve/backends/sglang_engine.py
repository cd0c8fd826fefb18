"""SGLang (GPU nodes) behind the serving interface, with EAGLE-3 from the config.

``sglang`` is imported only when a replica builds the engine: it does not install on CPU
machines. Everything else here is pure and unit-tested: the ``sglang.Engine`` keyword
arguments, the equivalent ``python -m sglang.launch_server`` flags, the per-request sampling
dict, and the parsing of a response's ``meta_info`` (``spec_verify_ct`` becomes the same
``usage`` extension the eyas engine reports; acceptance length = completion_tokens /
spec_verify_ct, SGLang's).

Checked against sglang 0.5.23 (paths inside its wheel):

- overlap: EAGLE/EAGLE3 always run the v2 worker (``srt/speculative/spec_info.py``
  ``create_worker``); the overlap scheduler is on unless ``disable_overlap_schedule=True``.
  No environment variable switches it (0.5.23 never reads ``SGLANG_ENABLE_SPEC_V2``), so
  ``speculative.overlap_scheduler`` maps to ``disable_overlap_schedule`` only.
- capacity: without ``max_running_requests`` SGLang caps speculative engines at 48 running
  requests (``srt/arg_groups/speculative_hook.py`` ``_handle_eagle_family``);
  ``effective_max_running_requests`` reports that cap in ``/v1/server_info`` so the load test
  can warn about it.
- seeds: ``sampling_seed`` is read only with ``enable_deterministic_inference``
  (``srt/sampling/sampling_batch_info.py``); otherwise a seeded sampled request is rejected.
- metrics: ``enable_metrics`` goes with ``stat_loggers=build_ray_stat_loggers()``
  (``srt/observability/ray_wrappers.py``, as ``srt/ray/engine.py`` ``RayEngine`` does), so
  the ``sglang:*`` metrics reach Ray's Prometheus endpoint instead of an unscraped registry.
  Caveat, unverified without a GPU: the scheduler's collectors run in SGLang's scheduler
  subprocess, which is not a Ray worker (``RayEngine`` makes schedulers Ray actors instead);
  the replica process's (tokenizer manager) collectors are the ones sure to be exported.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from eyas.serve.backends.base import (
    GenerationChunk,
    SpecStats,
    local_draft_dir,
    target_model_path,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from eyas.engine.sampling import SamplingParams
    from eyas.serve.config import ServeConfig

SPEC_DEFAULT_MAX_RUNNING = 48  # sglang 0.5.23 speculative_hook.py, when max_running_requests is unset
_ACCEPTED_KEYS = ("spec_num_correct_drafts", "spec_accepted_drafts", "spec_accept_token_num",
                  "spec_accepted_tokens")


def engine_kwargs(cfg: ServeConfig, model_path: str, draft_path: str | None) -> dict[str, Any]:
    """``sglang.Engine(**kwargs)`` for ``cfg`` (ServerArgs names); ``extra_args`` may add
    arguments but not override the ones the config sets."""
    s = cfg.sglang
    kwargs: dict[str, Any] = {
        "model_path": model_path,
        "tokenizer_path": cfg.tokenizer or model_path,
        "served_model_name": cfg.model_name,
        "tp_size": s.tp_size,
        "dtype": s.dtype,
        "enable_metrics": s.enable_metrics,
        "log_level": s.log_level,
    }
    if s.enable_metrics:
        kwargs["stat_loggers"] = RAY_STAT_LOGGERS
    optional = {"context_length": s.context_length, "mem_fraction_static": s.mem_fraction_static,
                "max_running_requests": s.max_running_requests}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if cfg.speculative is not None:
        kwargs.update(speculative_kwargs(cfg, draft_path))
    clash = sorted(set(s.extra_args) & set(kwargs))
    if clash:
        raise ValueError(f"sglang.extra_args sets {clash}, which the config already sets; use "
                         "the dedicated keys (model, sglang.*, speculative.*) instead")
    return {**kwargs, **s.extra_args}


def speculative_kwargs(cfg: ServeConfig, draft_path: str | None) -> dict[str, Any]:
    """The EAGLE-3 arguments: algorithm and draft always, S/K/D all three or none."""
    spec = cfg.speculative
    if spec is None:
        return {}
    out: dict[str, Any] = {"speculative_algorithm": spec.algorithm,
                           "speculative_draft_model_path": draft_path or spec.draft_path}
    if spec.knobs_set:
        out.update(speculative_num_steps=spec.num_steps, speculative_eagle_topk=spec.eagle_topk,
                   speculative_num_draft_tokens=spec.num_draft_tokens)
    if not spec.overlap_scheduler:  # SGLang's default is overlap on
        out["disable_overlap_schedule"] = True
    return out


RAY_STAT_LOGGERS = "ray"
"""Placeholder for ``stat_loggers`` in the pure kwargs: ``materialize_kwargs`` swaps in
``sglang.srt.observability.ray_wrappers.build_ray_stat_loggers()`` (classes, not a string)."""


def materialize_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The kwargs ``sglang.Engine`` gets: the Ray stat loggers built (needs sglang)."""
    out = dict(kwargs)
    if out.get("stat_loggers") == RAY_STAT_LOGGERS:
        from sglang.srt.observability.ray_wrappers import build_ray_stat_loggers

        out["stat_loggers"] = build_ray_stat_loggers()
    return out


def effective_max_running_requests(kwargs: dict[str, Any]) -> int | None:
    """The running-request cap SGLang applies: the configured one, else 48 with speculation
    (sglang 0.5.23), else None (bounded by the KV cache only)."""
    value = kwargs.get("max_running_requests")
    if value is not None:
        return int(value)
    return SPEC_DEFAULT_MAX_RUNNING if kwargs.get("speculative_algorithm") else None


def deterministic(kwargs: dict[str, Any]) -> bool:
    """Whether SGLang honours per-request seeds (``enable_deterministic_inference``)."""
    return bool(kwargs.get("enable_deterministic_inference"))


def server_cli_args(kwargs: dict[str, Any]) -> list[str]:
    """The same arguments as ``python -m sglang.launch_server`` flags (``--tp-size 1``;
    booleans become a bare flag when true and are left out when false)."""
    args: list[str] = []
    for key, value in kwargs.items():
        if key == "stat_loggers":  # a ServerArgs field without a CLI flag (Python classes)
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif value is not None:
            args += [flag, str(value)]
    return args


def sampling_dict(params: SamplingParams, seeded: bool = False) -> dict[str, Any]:
    """SGLang's per-request ``sampling_params`` for the engine's ``SamplingParams``.

    ``seeded``: the engine runs with ``enable_deterministic_inference`` (the only mode in
    which SGLang reads ``sampling_seed``). Without it a seed on a sampled request
    (temperature > 0) raises ValueError (400): SGLang would silently ignore it. A greedy
    request's seed changes nothing and is dropped."""
    out: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": True,
    }
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None and seeded:
        out["sampling_seed"] = params.seed
    elif params.seed is not None and params.temperature > 0:
        raise ValueError("seed is not supported by this server (backend sglang without "
                         "enable_deterministic_inference: SGLang would ignore it); remove seed, "
                         "or set sglang.extra_args.enable_deterministic_inference: true")
    return out


def finish_reason(meta_info: dict[str, Any]) -> str | None:
    """OpenAI's finish reason from SGLang's ``meta_info["finish_reason"]``."""
    fr = meta_info.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind is None:
        return None
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(str(kind), str(kind))


def spec_stats(meta_info: dict[str, Any]) -> SpecStats | None:
    """Per-request speculative statistics; None without ``spec_verify_ct`` (no speculation).

    Without an accepted-draft count in ``meta_info``: the prefill emits one token that no
    verify step produced, and each verify step emits its accepted drafts + 1 token, so
    accepted = completion - verify - 1 (clamped at 0)."""
    verify = meta_info.get("spec_verify_ct")
    if not isinstance(verify, int):
        return None
    completion = int(meta_info.get("completion_tokens") or 0)
    accepted = next((int(meta_info[k]) for k in _ACCEPTED_KEYS
                     if isinstance(meta_info.get(k), int)), max(completion - verify - 1, 0))
    return SpecStats(verify_steps=verify, accepted_tokens=accepted, decoded_tokens=completion)


def text_delta(previous: str, text: str) -> str:
    """The new part of SGLang's cumulative streamed ``text``."""
    if not text.startswith(previous):
        raise RuntimeError("SGLang streamed text that does not extend the previous text; run "
                           "SGLang with incremental_streaming_output off (its default)")
    return text[len(previous):]


def info_dict(kwargs: dict[str, Any], max_context: int,
              resolved_max_running: int | None = None) -> dict[str, Any]:
    """``backend_info`` of ``/v1/server_info``: the engine arguments and the running-request
    cap (the load test reads ``max_running_requests`` to warn about a cap below its load)."""
    cap = resolved_max_running or effective_max_running_requests(kwargs)
    return {"engine": "sglang", "max_context": max_context, "max_running_requests": cap,
            "server_args": {k: v for k, v in kwargs.items()
                            if k not in ("log_level", "stat_loggers")}}


class SGLangStream:
    """The ``GenerationStream`` over one ``async_generate(stream=True)`` generator."""

    def __init__(self, engine: Any, request_id: str, outputs: AsyncIterator[dict]) -> None:
        self._engine, self._id, self._outputs = engine, request_id, outputs
        self._text = ""
        self._tokens = 0
        self._done = False

    def __aiter__(self) -> SGLangStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._outputs.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise
        return self._chunk(out)

    def _chunk(self, out: dict[str, Any]) -> GenerationChunk:
        meta = out.get("meta_info") or {}
        delta = text_delta(self._text, out.get("text") or "")
        self._text += delta
        completion = int(meta.get("completion_tokens") or 0)
        new, self._tokens = completion - self._tokens, completion
        reason = finish_reason(meta)
        self._done = reason is not None
        return GenerationChunk(delta, new, int(meta.get("prompt_tokens") or 0), completion,
                               reason, spec_stats(meta) if reason else None)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.tokenizer_manager.abort_request(rid=self._id)
        with contextlib.suppress(Exception):  # best effort: the generator may be mid-await
            await self._outputs.aclose()


class SGLangBackend:
    """``sglang.Engine`` in the replica process (needs GPUs and the ``sglang`` extra)."""

    name = "sglang"

    def __init__(self, cfg: ServeConfig, tokenizer: Any) -> None:
        try:
            import sglang
        except ImportError as exc:
            raise ImportError("backend sglang needs the sglang package on the GPU nodes: "
                              "pip install 'eyas[sglang]', or use backend eyas") from exc
        model = target_model_path(cfg.model)
        draft = None
        if cfg.speculative is not None:
            draft = local_draft_dir(cfg.speculative.draft_path, "speculative.draft_path")
        self.kwargs = engine_kwargs(cfg, model, draft)
        self.engine = sglang.Engine(**materialize_kwargs(self.kwargs))
        self.tokenizer = tokenizer
        self.max_context = self._context_length(cfg)

    def _context_length(self, cfg: ServeConfig) -> int:
        """SGLang's resolved context length (else the configured one)."""
        tm = getattr(self.engine, "tokenizer_manager", None)
        value = getattr(tm, "context_len", None) or cfg.sglang.context_length
        if not value:
            raise RuntimeError("could not read SGLang's context length; set "
                               "sglang.context_length in the config")
        return int(value)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> SGLangStream:
        outputs = await self.engine.async_generate(input_ids=list(prompt_ids),
                                                   sampling_params=sampling_dict(
                                                       params, deterministic(self.kwargs)),
                                                   stream=True, rid=request_id)
        return SGLangStream(self.engine, request_id, outputs)

    def info(self) -> dict[str, Any]:
        return info_dict(self.kwargs, self.max_context, self._resolved_max_running())

    def round_stats(self) -> None:
        """None: SGLang runs one static speculation setting per server (no per-round choice)."""
        return None

    def _resolved_max_running(self) -> int | None:
        """SGLang's resolved ``max_running_requests`` when its tokenizer manager shows it."""
        args = getattr(getattr(self.engine, "tokenizer_manager", None), "server_args", None)
        value = getattr(args, "max_running_requests", None)
        return value if isinstance(value, int) else None

    def check_health(self) -> None:
        if getattr(self.engine, "tokenizer_manager", None) is None:
            raise RuntimeError("the SGLang engine has shut down; restart the replica")

    def shutdown(self) -> None:
        self.engine.shutdown()
