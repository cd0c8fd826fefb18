"""Load-test metrics on hand-built timelines, plus the other pure pieces of eyas.loadtest
(stream parsing, request bodies, load plans, workloads, config): no Ray, no network."""

from __future__ import annotations

import json
import math
import random

import pytest

from eyas.config import ConfigError, validate_config
from eyas.loadtest import client, metrics, runner, workloads
from eyas.loadtest.config import LoadTestConfig, WorkloadConfig
from eyas.loadtest.metrics import RequestRecord


def rec(chunks: list[float], out: int | None, end: float, cum: list[int | None] | None = None,
        start: float = 100.0, **kw) -> RequestRecord:
    """A request starting at ``start`` whose content chunks arrive at ``chunks`` (offsets)."""
    return RequestRecord(endpoint="e", point="c1", index=0, start=start, end=start + end,
                         chunk_times_s=chunks, chunk_cum_tokens=cum or [None] * len(chunks),
                         output_tokens=out, **kw)


# --- per-request metrics -----------------------------------------------------------------------

def flat(pairs: list[tuple[float, float]]) -> list[float]:
    """(value, weight) pairs -> [v0, w0, v1, w1, ...] for pytest.approx."""
    return [x for pair in pairs for x in pair]


def test_single_token_chunks() -> None:
    r = rec([0.2, 0.22, 0.24, 0.26], out=4, end=0.27)
    assert metrics.ttft_s(r) == pytest.approx(0.2)
    assert metrics.e2e_s(r) == pytest.approx(0.27)
    assert metrics.tpot_s(r) == pytest.approx(0.07 / 3)
    assert flat(metrics.itl_samples(r)) == pytest.approx(flat([(0.02, 1.0)] * 3))


def test_multi_token_chunks_with_usage_deltas() -> None:
    # 1 token at 200 ms, then chunks of 3, 3, 2 tokens: 60, 60, 40 ms apart (20 ms per token).
    r = rec([0.2, 0.26, 0.32, 0.36], out=9, end=0.36, cum=[1, 4, 7, 9])
    assert metrics.chunk_token_counts(r) == [1, 3, 3, 2]
    assert metrics.tpot_s(r) == pytest.approx(0.16 / 8)
    assert flat(metrics.itl_samples(r)) == pytest.approx(flat([(0.02, 3.0), (0.02, 3.0), (0.02, 2.0)]))


def test_multi_token_chunks_without_usage_spread_evenly() -> None:
    r = rec([0.2, 0.26, 0.32, 0.36], out=9, end=0.36)
    assert metrics.chunk_token_counts(r) == pytest.approx([2.25] * 4)
    # each gap / 2.25, weighted by 2.25 tokens (not repeated round(2.25) = 2 times)
    assert flat(metrics.itl_samples(r)) == pytest.approx(flat([(0.06 / 2.25, 2.25)] * 2 + [(0.04 / 2.25, 2.25)]))
    d = metrics.describe_weighted(metrics.itl_samples(r), "itl", 1.0)
    assert d["itl_mean"] == pytest.approx(0.16 / 6.75)  # 0.16 s over the 6.75 tokens after chunk 0
    assert metrics.tpot_s(r) == pytest.approx(0.02)  # TPOT never depends on the chunk split


def test_partial_usage_falls_back_to_even_spread() -> None:
    r = rec([0.1, 0.2], out=4, end=0.2, cum=[1, None])
    assert metrics.chunk_token_counts(r) == [2.0, 2.0]


def test_one_output_token_has_ttft_but_no_tpot_or_itl() -> None:
    r = rec([0.15], out=1, end=0.16)
    assert metrics.ttft_s(r) == pytest.approx(0.15)
    assert metrics.tpot_s(r) is None
    assert metrics.itl_samples(r) == []


def test_failed_request_has_no_latencies() -> None:
    r = rec([0.1, 0.2], out=None, end=0.3, error_kind="connection")
    assert not r.ok
    assert metrics.ttft_s(r) is None and metrics.e2e_s(r) is None and metrics.tpot_s(r) is None
    assert metrics.itl_samples(r) == []


def test_percentile_matches_linear_interpolation() -> None:
    values = [random.Random(3).uniform(0, 10) for _ in range(37)]
    s = sorted(values)
    assert metrics.percentile(values, 0) == s[0] and metrics.percentile(values, 100) == s[-1]
    pos = 36 * 0.9
    assert metrics.percentile(values, 90) == pytest.approx(s[32] + (s[33] - s[32]) * (pos - 32))
    assert metrics.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert math.isnan(metrics.percentile([], 50))


def test_describe_scales() -> None:
    d = metrics.describe([0.01, 0.02, 0.03], "tpot_ms", 1e3)
    assert d["tpot_ms_mean"] == pytest.approx(20) and d["tpot_ms_median"] == pytest.approx(20)
    assert math.isnan(metrics.describe([], "x")["x_mean"])


def test_zero_token_chunk_time_goes_into_the_next_gap() -> None:
    """Chunks at 0.1, 0.2, 0.5, 0.6 s with cumulative tokens 1, 2, 2, 3: ITLs 0.1 and 0.4 (the
    old rule skipped the empty chunk AND restarted the gap at it, losing 0.3 s)."""
    r = rec([0.1, 0.2, 0.5, 0.6], out=3, end=0.6, cum=[1, 2, 2, 3])
    assert flat(metrics.itl_samples(r)) == pytest.approx(flat([(0.1, 1.0), (0.4, 1.0)]))
    assert sum(g * w for g, w in metrics.itl_samples(r)) == pytest.approx(0.5)  # all time counted


def test_weighted_statistics_match_numpy_inverted_cdf() -> None:
    import numpy as np

    pairs = [(0.01, 3.0), (0.05, 1.0), (0.02, 2.5), (0.2, 0.5)]
    values, weights = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    d = metrics.describe_weighted(pairs, "itl_ms", 1e3)
    for q, key in ((50, "median"), (90, "p90"), (99, "p99")):
        ref = np.percentile(values, q, weights=weights, method="inverted_cdf") * 1e3
        assert d[f"itl_ms_{key}"] == pytest.approx(ref)
    assert d["itl_ms_mean"] == pytest.approx(np.average(values, weights=weights) * 1e3)
    assert d["itl_ms_max"] == pytest.approx(200)


def test_acceptance_length_reported_or_derived() -> None:
    assert metrics.request_acceptance(rec([0.1], 10, 0.5, acceptance_length=3.2)) == 3.2
    assert metrics.request_acceptance(rec([0.1], 12, 0.5, spec_verify_ct=4)) == 3.0
    assert metrics.request_acceptance(rec([0.1], 12, 0.5)) is None


def test_slo_check() -> None:
    r = rec([0.1, 0.2], out=3, end=0.3)  # TTFT 100 ms, TPOT 100 ms
    assert metrics.meets_slo(r, None, None)
    assert metrics.meets_slo(r, 100, 100) and not metrics.meets_slo(r, 99, None)
    assert not metrics.meets_slo(r, None, 99)
    assert metrics.meets_slo(rec([0.1], out=1, end=0.1), 200, 1)  # TPOT undefined: passes


def test_jsonl_line_round_trips() -> None:
    from eyas.loadtest.report import request_line

    r = rec([0.2, 0.26], out=4, end=0.3, cum=[1, 4], spec_verify_ct=2)
    line = json.loads(request_line(r))
    assert line["ttft_ms"] == pytest.approx(200) and line["tpot_ms"] == pytest.approx(100 / 3)
    assert RequestRecord.from_dict(line) == r


# --- aggregates --------------------------------------------------------------------------------

def test_summarize_counts_only_successes_and_classifies_errors() -> None:
    ok1 = rec([0.1, 0.2], out=11, end=1.1, start=10.0)  # TTFT 100, TPOT 100
    ok2 = rec([0.3, 0.4], out=6, end=0.8, start=10.5)  # TTFT 300, TPOT 100, ends at 11.3
    one = rec([0.05], out=1, end=0.06, start=11.0)
    bad = [rec([], None, 0.01, start=11.0, error_kind="http_500"),
           rec([0.1], None, 1.0, start=11.2, error_kind="timeout"),
           rec([], None, 0.01, start=11.1, error_kind="http_500")]
    row = metrics.summarize([ok1, ok2, one, *bad], ttft_ms=200, tpot_ms=150)
    assert row["num_requests"] == 6 and row["completed"] == 3 and row["failed"] == 3
    assert row["errors_by_kind"] == {"http_500": 2, "timeout": 1}
    assert row["error_rate"] == pytest.approx(0.5)
    assert row["wall_s"] == pytest.approx(12.2 - 10.0)  # the timeout ended last
    assert row["total_output_tokens"] == 18
    assert row["output_throughput"] == pytest.approx(18 / 2.2)
    assert row["request_throughput"] == pytest.approx(3 / 2.2)
    assert row["goodput"] == pytest.approx(2 / 2.2)  # ok2 misses the TTFT bound
    assert row["ttft_ms_median"] == pytest.approx(100)
    assert row["tpot_ms_mean"] == pytest.approx(100)  # the 1-token request has no TPOT
    assert row["itl_ms_max"] == pytest.approx(100 / 3)  # ok2: 6 tokens over 2 chunks
    assert row["acceptance_length_mean"] is None


def test_summarize_empty_and_all_failed() -> None:
    row = metrics.summarize([rec([], None, 0.1, error_kind="connection")])
    assert row["completed"] == 0 and row["error_rate"] == 1.0
    assert row["total_output_tokens"] == 0 and math.isnan(row["ttft_ms_median"])


# --- stream parsing (client) -------------------------------------------------------------------

def test_parse_sse_lines() -> None:
    assert client.parse_sse_line(b"data: [DONE]") == "done"
    assert client.parse_sse_line(b": keep-alive") is None
    assert client.parse_sse_line(b"\r") is None
    assert client.parse_sse_line(b'data: {"a": 1}\r') == {"a": 1}
    with pytest.raises(client.ProtocolError, match="not JSON"):
        client.parse_sse_line(b"data: {oops")
    with pytest.raises(client.ProtocolError, match="not a JSON object"):
        client.parse_sse_line(b"data: [1, 2]")


def test_apply_chunk_records_content_usage_and_spec() -> None:
    r = RequestRecord(endpoint="e", point="p", index=0, start=0.0)
    client.apply_chunk(r, {"choices": [{"delta": {"role": "assistant"}}]}, 0.01)
    client.apply_chunk(r, {"choices": [{"delta": {"content": "a b"}}],
                           "usage": {"completion_tokens": 2}}, 0.2)
    client.apply_chunk(r, {"choices": [{"text": "c"}]}, 0.25)
    client.apply_chunk(r, {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 7,
                                                    "spec_verify_ct": 2}}, 0.26)
    assert r.chunk_times_s == [0.2, 0.25] and r.chunk_cum_tokens == [2, None]
    assert r.output_tokens == 3 and r.prompt_tokens == 7 and r.spec_verify_ct == 2
    with pytest.raises(client.StreamError):
        client.apply_chunk(r, {"error": {"message": "overloaded"}}, 0.3)


@pytest.mark.parametrize("chunk", [
    {"usage": {"acceptance_length": 2.5, "spec_verify_ct": 4}},
    {"usage": {"spec": {"accept_length": 2.5, "spec_verify_ct": 4}}},
    {"spec_accept_length": 2.5, "meta_info": {"spec_verify_ct": 4}},
    {"speculative": {"acceptance_length": 2.5}, "spec_verify_ct": 4},
])
def test_spec_stats_found_where_servers_put_them(chunk: dict) -> None:
    assert client.spec_stats(chunk) == (2.5, 4)


def test_spec_stats_absent() -> None:
    assert client.spec_stats({"usage": {"completion_tokens": 3}}) == (None, None)


def test_classify_errors() -> None:
    import aiohttp

    assert client.classify(TimeoutError()) == "timeout"
    assert client.classify(aiohttp.ServerTimeoutError()) == "timeout"
    assert client.classify(aiohttp.ServerDisconnectedError()) == "connection"
    assert client.classify(aiohttp.ClientPayloadError("cut")) == "connection"
    assert client.classify(client.ProtocolError("x")) == "protocol"
    # a connection lost mid-stream, after the 200, is a lost replica; before any answer it is not
    assert client.failure_kind(aiohttp.ClientPayloadError("cut"), 200) == "replica_lost"
    assert client.failure_kind(aiohttp.ServerDisconnectedError(), 200) == "replica_lost"
    assert client.failure_kind(aiohttp.ServerDisconnectedError(), None) == "connection"
    assert client.failure_kind(client.ProtocolError("x"), 200) == "protocol"
    assert client.classify(client.StreamError("x")) == "server_error"


def test_urls_and_bodies() -> None:
    assert client.completions_url("http://h:1", True) == "http://h:1/v1/chat/completions"
    assert client.completions_url("http://h:1/v1/", False) == "http://h:1/v1/completions"
    assert client.make_target("http://h", True, "k").headers["Authorization"] == "Bearer k"
    chat = client.build_body(workloads.Prompt(messages=[{"role": "user", "content": "hi"}]),
                             "m", 8, 0.0, ignore_eos=True, continuous_usage=True,
                             extra={"top_k": 1})
    assert chat["stream"] and chat["stream_options"] == {"include_usage": True,
                                                        "continuous_usage_stats": True}
    assert chat["messages"][0]["content"] == "hi" and chat["ignore_eos"] and chat["top_k"] == 1
    text = client.build_body(workloads.Prompt(text="hi"), "m", 8, 0.0)
    assert text["prompt"] == "hi" and "messages" not in text and "ignore_eos" not in text


# --- load plans (runner) -----------------------------------------------------------------------

def test_split_weighted() -> None:
    assert runner.split_weighted(10, [1, 1, 1]) == [4, 3, 3]
    assert runner.split_weighted(64, [3, 2]) == [38, 26]
    assert runner.split_weighted(0, [2, 2]) == [0, 0]


def test_closed_loop_plans_partition_lanes_and_requests() -> None:
    plans = runner.closed_loop_plans({"endpoint": "e", "point": "c5", "start_at": 0.0,
                                      "timeout_s": 1.0}, 5, 17, 5, num_actors=3)
    assert [p.concurrency for p in plans] == [2, 2, 1]
    assert [p.lane_first for p in plans] == [0, 2, 4] and plans[0].total_lanes == 5
    assert sorted(i for p in plans for i in p.indices) == list(range(17))
    assert sorted(i for p in plans for i in p.warmup_indices) == list(range(5))
    one = runner.closed_loop_plans({"endpoint": "e", "point": "c1", "start_at": 0.0,
                                    "timeout_s": 1.0}, 1, None, 0, num_actors=4)
    assert len(one) == 1 and one[0].indices is None and one[0].total is None


def test_poisson_arrivals_seeded_with_the_right_rate() -> None:
    a = runner.poisson_arrivals(50.0, seed=1, n=2000, duration_s=None)
    assert a == runner.poisson_arrivals(50.0, seed=1, n=2000, duration_s=None)
    assert a != runner.poisson_arrivals(50.0, seed=2, n=2000, duration_s=None)
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:], strict=False))
    assert (len(a) - 1) / a[-1] == pytest.approx(50.0, rel=0.08)
    capped = runner.poisson_arrivals(50.0, seed=1, n=None, duration_s=1.0)
    assert capped == [x for x in a if x < 1.0]


def test_open_loop_plans_deal_round_robin() -> None:
    plans = runner.open_loop_plans({"endpoint": "e", "point": "r", "start_at": 0.0,
                                    "timeout_s": 1.0}, [0.0, 0.1, 0.2, 0.3, 0.4], 2)
    assert plans[0].indices == [0, 2, 4] and plans[0].arrivals == [0.0, 0.2, 0.4]
    assert plans[1].indices == [1, 3] and plans[1].arrivals == [0.1, 0.3]


def test_point_phases_and_default_warmup() -> None:
    cfg = LoadTestConfig(endpoints=[{"name": "a", "url": "http://x", "model": "m"}],
                         concurrencies=[4], request_rates=[2.0], requests_per_point=6,
                         output="/tmp/x")
    closed, rate = runner.sweep_points(cfg)
    assert [p.label for p in (closed, rate)] == ["c4", "rate2"]
    (phase,) = runner.point_phases(cfg, closed, "a", 2)
    assert sum(len(p.warmup_indices) for p in phase) == 4  # default: one per lane
    warm, measured = runner.point_phases(cfg, rate, "a", 2)
    assert sum(len(p.warmup_indices) for p in warm) == runner.RATE_WARMUP
    assert sum(len(p.indices) for p in measured) == 6


# --- workloads and config ----------------------------------------------------------------------

def test_synthetic_workloads_are_seeded() -> None:
    cfg = WorkloadConfig(kind="synthetic", input_len=12, num_prompts=3)
    a, b = workloads.load_prompts(cfg, 5), workloads.load_prompts(cfg, 5)
    assert a == b and a != workloads.load_prompts(cfg, 6)
    assert len(a[0].messages[0]["content"].split()) == 12
    shared = workloads.load_prompts(WorkloadConfig(kind="shared_prefix", prefix_len=20,
                                                   input_len=4, num_prompts=3, chat=False), 0)
    heads = {p.text.split("\n\n")[0] for p in shared}
    assert len(heads) == 1 and len(heads.pop().split()) == 20
    assert len({p.text for p in shared}) == 3


def test_prompts_file_formats(tmp_path) -> None:
    rows = [{"prompt": "p1"}, {"text": "p2"}, {"messages": [{"role": "user", "content": "p3"}]},
            {"question_id": 81, "turns": ["p4", "follow-up"]}]
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = workloads.load_prompts(WorkloadConfig(kind="prompts_file", path=str(jl)), 0)
    assert [p.messages[-1]["content"] for p in got] == ["p1", "p2", "p3", "p4"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["a", "b"]))
    got = workloads.load_prompts(WorkloadConfig(kind="prompts_file", path=str(js), chat=False,
                                                num_prompts=1), 0)
    assert got == [workloads.Prompt(text="a")]
    with pytest.raises(ValueError, match="workload.chat is false"):
        workloads.load_prompts(WorkloadConfig(kind="prompts_file", path=str(jl), chat=False), 0)


def test_config_validation_names_the_problem() -> None:
    ep = [{"name": "a", "url": "http://x", "model": "m"}]
    with pytest.raises(ConfigError, match="no load point"):
        validate_config(LoadTestConfig, {"endpoints": ep, "concurrencies": [], "output": "o"})
    with pytest.raises(ConfigError, match="unique"):
        validate_config(LoadTestConfig, {"endpoints": ep * 2, "output": "o"})
    with pytest.raises(ConfigError, match="never end"):
        validate_config(LoadTestConfig, {"endpoints": ep, "output": "o",
                                         "requests_per_point": None})
    with pytest.raises(ConfigError, match="workload.path"):
        validate_config(LoadTestConfig, {"endpoints": ep, "output": "o",
                                         "workload": {"kind": "prompts_file"}})
    with pytest.raises(ConfigError, match="concurency"):
        validate_config(LoadTestConfig, {"endpoints": ep, "output": "o", "concurency": [1]})
    cfg = validate_config(LoadTestConfig, {"endpoints": ep, "output": "o", "max_tokens": 9})
    assert cfg.concurrencies == [1, 2, 4, 8, 16, 32, 64] and cfg.temperature == 0.0
    assert cfg.request_max_tokens == 9


# --- a replica lost under load -----------------------------------------------------------------


def test_plain_text_5xx_is_replica_lost() -> None:
    # Ray Serve's proxy answers uvicorn's plain-text 500 when the request's replica died
    assert client.http_error_kind(500, "text/plain; charset=utf-8") == "replica_lost"
    assert client.http_error_kind(503, "") == "replica_lost"
    assert client.http_error_kind(500, "application/json") == "http_500"  # the app's own error
    assert client.http_error_kind(429, "text/plain") == "http_429"


def test_recovery_time_after_a_replica_is_lost() -> None:
    before = rec([0.1], out=2, end=1.0, start=0.0)
    lost = [rec([], None, 0.5, start=t, error_kind="replica_lost") for t in (4.0, 4.2)]
    # requests started after the loss wait for the new replica; the first one ends at 15.7
    after = [rec([8.0], out=2, end=11.2, start=4.5), rec([7.0], out=2, end=11.0, start=5.0)]
    row = metrics.summarize([before, *lost, *after])
    assert row["errors_by_kind"] == {"replica_lost": 2} and row["replica_lost"] == 2
    assert row["recovery_s"] == pytest.approx(15.7 - 4.5)
    assert metrics.recovery_s([before]) is None
    assert math.isnan(metrics.recovery_s([before, *lost]))


def test_table_reports_lost_requests_and_recovery() -> None:
    from types import SimpleNamespace

    from eyas.loadtest.report import format_table

    base = {"request_throughput": 1.0, "output_throughput": 10.0, "ttft_ms_median": 5.0,
            "tpot_ms_median": 2.0, "itl_ms_median": 2.0, "acceptance_length_mean": None,
            "error_rate": 0.08}
    rows = [base | {"point": "c16", "endpoint": "eagle3", "replica_lost": 16,
                    "recovery_s": 11.6}]
    table = format_table(SimpleNamespace(rows=rows))
    assert table.splitlines()[-1] == ("  c16 eagle3: 16 requests lost with a replica; "
                                      "service back after 11.6 s")


def test_speculation_shares_per_point_from_server_info() -> None:
    from eyas.loadtest.runner import round_counts, round_shares

    def info(**rounds: int) -> dict:
        return {"backend_info": {"speculation_rounds": {
            name.replace("_", " "): {"rounds": n, "share": 0.0} for name, n in rounds.items()}}}

    before = round_counts(info(plain=10, chain_3=30))
    after = round_counts(info(plain=40, chain_3=40, tree=10))
    assert before == {"plain": 10, "chain 3": 30}
    assert round_shares(before, after) == {"chain 3": 0.2, "plain": 0.6, "tree": 0.2}
    assert round_shares(None, after) is None and round_counts({"backend_info": {}}) is None
    assert round_counts(None) is None
    assert round_shares(after, before) is None  # counts went down: another replica answered
    assert round_shares(before, before) is None  # no round in between
    # A replica that has not decoded yet reports no rounds: its first point still gets shares.
    assert round_shares(round_counts(info()), before) == {"chain 3": 0.75, "plain": 0.25}


def test_table_and_csv_show_speculation_shares() -> None:
    from types import SimpleNamespace

    from eyas.loadtest.report import csv_bytes, format_table

    base = {"request_throughput": 1.0, "output_throughput": 10.0, "ttft_ms_median": 5.0,
            "tpot_ms_median": 2.0, "itl_ms_median": 2.0, "acceptance_length_mean": 1.4,
            "error_rate": 0.0, "errors_by_kind": {}}
    rows = [base | {"point": "c16", "endpoint": "base", "speculation_shares": None},
            base | {"point": "c16", "endpoint": "eagle3",
                    "speculation_shares": {"chain 2/1/3": 0.375, "plain": 0.625}}]
    lines = format_table(SimpleNamespace(rows=rows)).splitlines()
    assert lines[-1] == "  c16 eagle3: decode rounds plain 62%, chain 2/1/3 38%"
    assert not any("c16 base:" in line for line in lines)
    csv_text = csv_bytes(rows).decode()
    assert "chain 2/1/3:0.375;plain:0.625" in csv_text
