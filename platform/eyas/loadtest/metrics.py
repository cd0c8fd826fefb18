"""Load-test metrics as pure functions of request timelines (no I/O, no clocks).

Definitions (docs/EAGLE3.md, "Load-test metric definitions"):

- TTFT: request start -> arrival of the first chunk that carries content.
- E2E: request start -> end of the stream.
- TPOT: ``(e2e - ttft) / (output_tokens - 1)``, only when output_tokens > 1, where
  output_tokens is the server's ``usage.completion_tokens`` (never the number of chunks).
- ITL: for every content chunk after the first that carried tokens, the gap since the previous
  chunk that carried tokens, divided by the tokens the chunk carried and weighted by them
  (token-weighted statistics, as SGLang's bench_serving counts per token), so that mean ITL and
  TPOT agree when chunks carry several tokens. A zero-token chunk's time goes into the next gap.
  vLLM's ``bench serve`` records one ITL per chunk instead (one per verify step under
  speculation): its numbers are per step, these are per token.
- Tokens per chunk: when the server sends a cumulative ``usage.completion_tokens`` with each
  chunk (``continuous_usage_stats``), a chunk carries the increase since the previous content
  chunk. Otherwise every content chunk is taken to carry ``output_tokens / content_chunks``
  tokens: the exact total, spread evenly (the per-chunk split is unknown, and a fractional
  average is less biased than assuming one token per chunk).
- Throughput: successful requests' output tokens (and requests) / wall time of the point.
- Goodput: successful requests/s meeting both SLOs; TPOT is not defined for 1-token outputs,
  so such requests pass the TPOT bound.
- Recovery: when requests were lost with a replica (error kind ``replica_lost``), the seconds
  from the first such failure reaching the client to the end of the first successful request
  that started after it (service is back once a new request completes).

Latencies in summaries are milliseconds; timeline fields are seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request's timeline as the client saw it.

    ``start`` and ``end`` are wall-clock seconds (comparable across client actors on one host);
    ``chunk_times_s`` are content-chunk arrival offsets from ``start``.
    """

    endpoint: str
    point: str
    index: int
    start: float
    end: float | None = None
    warmup: bool = False
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_cum_tokens: list[int | None] = field(default_factory=list)
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    acceptance_length: float | None = None
    spec_verify_ct: int | None = None
    error_kind: str | None = None
    error: str | None = None
    http_status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        """From ``to_dict`` output or a requests.jsonl line (derived keys are ignored)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def ttft_s(r: RequestRecord) -> float | None:
    """Seconds from start to the first content chunk; None for failed or empty requests."""
    return r.chunk_times_s[0] if r.ok and r.chunk_times_s else None


def e2e_s(r: RequestRecord) -> float | None:
    """Seconds from start to the end of the stream; None for failed requests."""
    return r.end - r.start if r.ok and r.end is not None else None


def tpot_s(r: RequestRecord) -> float | None:
    """``(e2e - ttft) / (output_tokens - 1)``; None unless the request succeeded with >1 token."""
    ttft, e2e = ttft_s(r), e2e_s(r)
    if ttft is None or e2e is None or not r.output_tokens or r.output_tokens < 2:
        return None
    return (e2e - ttft) / (r.output_tokens - 1)


def chunk_token_counts(r: RequestRecord) -> list[float]:
    """Tokens carried by each content chunk (see the module docstring for the rule)."""
    n = len(r.chunk_times_s)
    if n == 0:
        return []
    cum = r.chunk_cum_tokens
    if len(cum) == n and all(c is not None for c in cum):
        counts, prev = [], 0
        for c in cum:
            counts.append(float(c - prev))
            prev = c
        return counts
    return [(r.output_tokens or 0) / n] * n


def itl_samples(r: RequestRecord) -> list[tuple[float, float]]:
    """Inter-token latencies of a successful request as (seconds per token, tokens) pairs.

    One pair per content chunk after the first that carried tokens: the gap since the previous
    chunk that carried tokens, divided by this chunk's tokens and weighted by them (the
    statistics are token-weighted, so fractional even-spread counts stay exact). A chunk the
    server says carried no token gives no pair and does not move the anchor: its time goes into
    the next gap (as SGLang's bench_serving counts it).
    """
    if not r.ok or not r.chunk_times_s:
        return []
    out: list[tuple[float, float]] = []
    anchor = r.chunk_times_s[0]
    for t, tokens in list(zip(r.chunk_times_s, chunk_token_counts(r), strict=True))[1:]:
        if tokens <= 0:
            continue
        out.append(((t - anchor) / tokens, tokens))
        anchor = t
    return out


def weighted_percentile(pairs: list[tuple[float, float]], q: float) -> float:
    """The q-th percentile (0..100) of weighted values, inverted-CDF: the smallest value whose
    cumulative weight reaches q% of the total (numpy's ``method="inverted_cdf"`` with weights)."""
    if not pairs:
        return math.nan
    ordered = sorted(pairs)
    total = sum(w for _, w in ordered)
    target, seen = total * q / 100.0, 0.0
    for value, weight in ordered:
        seen += weight
        if seen >= target - 1e-12 * total:
            return value
    return ordered[-1][0]


def describe_weighted(pairs: list[tuple[float, float]], prefix: str, scale: float = 1.0
                      ) -> dict[str, float]:
    """``describe`` for (value, weight) pairs: weighted mean, median, p90, p99 and the max."""
    v = [(x * scale, w) for x, w in pairs]
    total = sum(w for _, w in v)
    return {
        f"{prefix}_mean": sum(x * w for x, w in v) / total if total else math.nan,
        f"{prefix}_median": weighted_percentile(v, 50),
        f"{prefix}_p90": weighted_percentile(v, 90),
        f"{prefix}_p99": weighted_percentile(v, 99),
        f"{prefix}_max": max(x for x, _ in v) if v else math.nan,
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default method)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def describe(values: list[float], prefix: str, scale: float = 1.0) -> dict[str, float]:
    """``{prefix}_mean/median/p90/p99`` of ``values * scale``; NaN when empty."""
    v = [x * scale for x in values]
    return {
        f"{prefix}_mean": sum(v) / len(v) if v else math.nan,
        f"{prefix}_median": percentile(v, 50),
        f"{prefix}_p90": percentile(v, 90),
        f"{prefix}_p99": percentile(v, 99),
    }


def error_counts(records: list[RequestRecord]) -> dict[str, int]:
    """Failed requests per error kind, sorted by kind."""
    counts: dict[str, int] = {}
    for r in records:
        if r.error_kind is not None:
            counts[r.error_kind] = counts.get(r.error_kind, 0) + 1
    return dict(sorted(counts.items()))


def wall_time_s(records: list[RequestRecord]) -> float:
    """First start to last end over all records (failed ones included: they took time too)."""
    ends = [r.end for r in records if r.end is not None]
    if not records or not ends:
        return 0.0
    return max(ends) - min(r.start for r in records)


def request_acceptance(r: RequestRecord) -> float | None:
    """Tokens per verification step: reported directly, or completion_tokens / spec_verify_ct."""
    if not r.ok:
        return None
    if r.acceptance_length is not None:
        return r.acceptance_length
    if r.spec_verify_ct and r.output_tokens:
        return r.output_tokens / r.spec_verify_ct
    return None


def meets_slo(r: RequestRecord, ttft_ms: float | None, tpot_ms: float | None) -> bool:
    """A successful request within both bounds (an unset bound, or an undefined TPOT, passes)."""
    ttft, tpot = ttft_s(r), tpot_s(r)
    if not r.ok or ttft is None:
        return False
    if ttft_ms is not None and ttft * 1e3 > ttft_ms:
        return False
    return not (tpot_ms is not None and tpot is not None and tpot * 1e3 > tpot_ms)


def recovery_s(records: list[RequestRecord]) -> float | None:
    """Seconds from the first ``replica_lost`` failure to the end of the first successful request
    started after it; None without such a failure, NaN when nothing succeeded afterwards."""
    lost = [r.end for r in records if r.error_kind == "replica_lost" and r.end is not None]
    if not lost:
        return None
    first = min(lost)
    back = [r.end for r in records if r.ok and r.end is not None and r.start >= first]
    return min(back) - first if back else math.nan


def _per_second(x: float, wall: float) -> float:
    return x / wall if wall > 0 else math.nan


def summarize(records: list[RequestRecord], ttft_ms: float | None = None,
              tpot_ms: float | None = None) -> dict[str, Any]:
    """Aggregate one endpoint at one point (warm-up records must already be filtered out)."""
    ok = [r for r in records if r.ok]
    wall = wall_time_s(records)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    errors = error_counts(records)
    acc = [a for a in (request_acceptance(r) for r in ok) if a is not None]
    row: dict[str, Any] = {
        "num_requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "error_rate": (len(records) - len(ok)) / len(records) if records else math.nan,
        "errors_by_kind": errors, "wall_s": wall, "total_output_tokens": out_tokens,
        "request_throughput": _per_second(len(ok), wall),
        "output_throughput": _per_second(out_tokens, wall),
        "goodput": _per_second(sum(meets_slo(r, ttft_ms, tpot_ms) for r in ok), wall),
        "acceptance_length_mean": sum(acc) / len(acc) if acc else None,
        "replica_lost": errors.get("replica_lost", 0), "recovery_s": recovery_s(records),
    }
    row.update(describe([v for v in map(ttft_s, ok) if v is not None], "ttft_ms", 1e3))
    row.update(describe([v for v in map(tpot_s, ok) if v is not None], "tpot_ms", 1e3))
    row.update(describe_weighted([p for r in ok for p in itl_samples(r)], "itl_ms", 1e3))
    row.update(describe([v for v in map(e2e_s, ok) if v is not None], "e2e_ms", 1e3))
    return row
