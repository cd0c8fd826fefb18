"""The pipeline report's explanation of the served speed-up, derived from served numbers."""

from __future__ import annotations

from eyas.pipeline_report import build_report, explain_point


def test_explanation_follows_from_tau_and_tpots() -> None:
    point = {"point": "c1", "baseline": {"tpot_ms_median": 40.0},
             "eagle3": {"tpot_ms_median": 20.0, "acceptance_length": 3.0}}
    line = explain_point(point)
    # 3 tokens per round at 20 ms each = 60 ms = 1.5 baseline steps; 40/20 = 2x faster
    assert "3.00 tokens" in line and "1.50 baseline decode steps" in line and "2.00x (faster)" in line
    slow = {"point": "c4", "baseline": {"tpot_ms_median": 10.0},
            "eagle3": {"tpot_ms_median": 12.5, "acceptance_length": 1.6}}
    assert "2.00 baseline decode steps" in explain_point(slow) and "(slower)" in explain_point(slow)
    assert explain_point({"point": "c8", "baseline": {}, "eagle3": {}}) is None


def test_report_carries_explanations() -> None:
    rows = [{"point": "c1", "endpoint": "baseline", "tpot_ms_median": 40.0, "output_throughput": 25.0},
            {"point": "c1", "endpoint": "eagle3", "tpot_ms_median": 20.0, "output_throughput": 50.0,
             "acceptance_length_mean": 3.0}]
    speedups = [{"point": "c1", "throughput": 2.0, "tpot": 2.0, "ttft": 1.0}]
    report = build_report({"loadtest": {"rows": rows, "speedups": speedups, "files": {}}})
    assert report["loadtest"]["explanation"][0].startswith("c1: each EAGLE-3 round emitted 3.00")
