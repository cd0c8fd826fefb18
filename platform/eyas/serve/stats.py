"""Per-replica serving statistics, exported as Ray metrics and shown by ``/v1/server_info``.

Ray metrics (``eyas.metrics``; tag ``model``), one series per replica:
- ``eyas_serve_ttft_seconds`` (histogram): request arrival -> first content token.
- ``eyas_serve_e2e_latency_seconds`` (histogram): request arrival -> last token.
- ``eyas_serve_output_tokens_total`` (counter) and ``eyas_serve_output_tokens_per_second``
  (gauge, over the last ``window_s`` seconds).
- ``eyas_serve_acceptance_length`` (gauge): tokens per verification step over all finished
  requests of this replica (1.0 without speculation).
- ``eyas_serve_running_requests`` / ``eyas_serve_queued_requests`` (gauges): in flight with /
  without a first token.
- ``eyas_serve_requests_total`` (counter, tag ``finish_reason``: stop, length, abort, error).
- ``eyas_serve_speculation_round_share`` (gauge, tag ``setting``: plain, chain 3/1/4,
  tree 5/4/8, ...): the share of this replica's decode rounds run with each setting (the
  eyas engine; with ``speculation: adaptive`` it picks one per round).
- ``eyas_serve_round_time_predicted_seconds`` / ``eyas_serve_round_time_measured_seconds``
  (gauges, tag ``setting``): the adaptive policy's predicted and the measured mean round time.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eyas import metrics
from eyas.serve.backends.base import SpecStats

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class ServeStats:
    """Counters of one replica; ``publish`` pushes them to Ray metrics (throttled)."""

    model: str
    rounds: Callable[[], dict[str, dict[str, Any]] | None] | None = None  # Backend.round_stats
    window_s: float = 10.0
    publish_every_s: float = 1.0
    queued: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    finish_reasons: Counter = field(default_factory=Counter)
    output_tokens: int = 0
    verify_steps: int = 0
    accepted_tokens: int = 0
    decoded_tokens: int = 0
    _recent: deque = field(default_factory=deque)  # (time, tokens)
    _last_publish: float = 0.0

    def start(self, request_id: str) -> None:
        self.queued.add(request_id)
        self.publish()

    def first_token(self, request_id: str, ttft_s: float) -> None:
        self.queued.discard(request_id)
        self.running.add(request_id)
        metrics.observe("eyas_serve_ttft_seconds", ttft_s, TTFT_BUCKETS,
                        "time to first content token", model=self.model)

    def tokens(self, n: int, now: float | None = None) -> None:
        if n <= 0:
            return
        self.output_tokens += n
        self._recent.append((time.monotonic() if now is None else now, n))
        metrics.inc("eyas_serve_output_tokens_total", n, "output tokens", model=self.model)
        self.publish()

    def finish(self, request_id: str, reason: str, e2e_s: float,
               spec: SpecStats | None) -> None:
        self.queued.discard(request_id)
        self.running.discard(request_id)
        self.finish_reasons[reason] += 1
        metrics.inc("eyas_serve_requests_total", 1, "finished requests", model=self.model,
                    finish_reason=reason)
        if reason in ("stop", "length"):
            metrics.observe("eyas_serve_e2e_latency_seconds", e2e_s, E2E_BUCKETS,
                            "request latency", model=self.model)
            if spec is not None:
                self.verify_steps += spec.verify_steps
                self.accepted_tokens += spec.accepted_tokens
                self.decoded_tokens += spec.decoded_tokens
        self.publish(force=True)

    @property
    def acceptance_length(self) -> float | None:
        """Tokens per verification step over finished requests (None before any)."""
        return self.decoded_tokens / self.verify_steps if self.verify_steps else None

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self.window_s

    def publish(self, force: bool = False) -> None:
        """Set the gauges (at most every ``publish_every_s`` unless forced)."""
        now = time.monotonic()
        if not force and now - self._last_publish < self.publish_every_s:
            return
        self._last_publish = now
        tags = {"model": self.model}
        metrics.set_gauge("eyas_serve_running_requests", len(self.running), "running", **tags)
        metrics.set_gauge("eyas_serve_queued_requests", len(self.queued), "queued", **tags)
        metrics.set_gauge("eyas_serve_output_tokens_per_second", self.tokens_per_second(now),
                          "output tokens per second", **tags)
        if self.acceptance_length is not None:
            metrics.set_gauge("eyas_serve_acceptance_length", self.acceptance_length,
                              "tokens per target verification step", **tags)
        self._publish_rounds(tags)

    def _publish_rounds(self, tags: dict[str, str]) -> None:
        """The decode rounds' gauges per speculation setting (when the backend counts them)."""
        for setting, rec in ((self.rounds() if self.rounds else None) or {}).items():
            metrics.set_gauge("eyas_serve_speculation_round_share", rec["share"],
                              "share of decode rounds run with this speculation setting",
                              setting=setting, **tags)
            for kind in ("predicted", "measured"):
                if rec[f"{kind}_ms"] is not None:
                    metrics.set_gauge(f"eyas_serve_round_time_{kind}_seconds",
                                      rec[f"{kind}_ms"] / 1e3,
                                      f"{kind} mean decode round time of this setting",
                                      setting=setting, **tags)

    def snapshot(self) -> dict:
        """The numbers ``/v1/server_info`` shows."""
        return {
            "running_requests": len(self.running),
            "queued_requests": len(self.queued),
            "finished_requests": dict(self.finish_reasons),
            "output_tokens_total": self.output_tokens,
            "output_tokens_per_second": self.tokens_per_second(),
            "acceptance_length": self.acceptance_length,
            "avg_spec_accept_length": self.acceptance_length,  # SGLang's /get_server_info name
            "spec_verify_ct_total": self.verify_steps,
            "spec_accepted_tokens_total": self.accepted_tokens,
        }
