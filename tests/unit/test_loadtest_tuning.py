"""Speculation tuning's pure parts: the recommendation per concurrency band, the tune and job
config rules, deployer loading, and the speedups the load-test job reports (no Ray, no I/O)."""

from __future__ import annotations

import math
import sys
import types

import pytest

from eyas.config import ConfigError, validate_config
from eyas.loadtest.job import LoadTestJobConfig, speedups
from eyas.loadtest.tuning import (
    SpecSetting,
    StaticDeployer,
    TuneConfig,
    format_recommendations,
    load_deployer,
    recommend,
)


def row(c: int, thr: float, tpot: float, err: float = 0.0, mode: str = "concurrency") -> dict:
    return {"point": f"c{c}", "mode": mode, "concurrency": c if mode == "concurrency" else None,
            "output_throughput": thr, "tpot_ms_median": tpot, "error_rate": err}


# "deep" drafts win at low load (more tokens per step, spare compute), "shallow" at high load
# (verification cost dominates): a crossover between the bands.
DEEP = [row(1, 200, 5.0), row(2, 380, 5.3), row(4, 700, 5.8), row(8, 1000, 8.0), row(16, 1300, 12.0)]
SHALLOW = [row(1, 150, 6.7), row(2, 290, 6.9), row(4, 560, 7.1), row(8, 1200, 6.7), row(16, 1800, 8.9)]
BASE = [row(1, 80, 12.5), row(2, 150, 13.0), row(4, 300, 13.3), row(8, 560, 14.0), row(16, 1000, 16.0)]


def test_crossover_gives_one_winner_per_band() -> None:
    recs = recommend({"deep": DEEP, "shallow": SHALLOW}, bands=[(1, 4), (8, 16)])
    assert [(r["band"], r["best"]) for r in recs] == [("1-4", "deep"), ("8-16", "shallow")]
    low, high = recs
    assert low["concurrencies"] == [1, 2, 4] and low["score"] == 1.0
    expected = (150 / 200 * 290 / 380 * 560 / 700) ** (1 / 3)  # geometric mean of relatives
    assert low["scores"]["shallow"] == pytest.approx(expected)
    assert high["scores"]["deep"] == pytest.approx(math.sqrt(1000 / 1200 * 1300 / 1800))


def test_tpot_objective_prefers_lower_latency() -> None:
    recs = recommend({"deep": DEEP, "shallow": SHALLOW}, bands=[(8, 8)], objective="tpot")
    (r,) = recs
    assert r["best"] == "shallow" and r["field"] == "tpot_ms_median"
    assert r["scores"]["deep"] == pytest.approx(6.7 / 8.0)


def test_speedup_over_reference_is_the_winners_geometric_mean() -> None:
    recs = recommend({"deep": DEEP, "shallow": SHALLOW}, bands=[(1, 2), (32, 64)], reference=BASE)
    assert recs[0]["speedup_vs_reference"] == pytest.approx(math.sqrt(200 / 80 * 380 / 150))
    assert recs[1]["best"] is None and "no closed-loop point" in recs[1]["reason"]
    partial = recommend({"deep": DEEP}, bands=[(1, 2)], reference=BASE[:1])
    assert partial[0]["best"] == "deep" and partial[0]["speedup_vs_reference"] is None


def test_errors_and_missing_points_disqualify() -> None:
    failing = [row(1, 999, 1.0, err=0.05), *DEEP[1:]]
    gappy = [r for r in SHALLOW if r["concurrency"] != 2]
    recs = recommend({"failing": failing, "gappy": gappy, "deep": DEEP}, bands=[(1, 4)])
    (r,) = recs
    assert r["best"] == "deep"
    assert "error rate 0.05" in r["disqualified"]["failing"]
    assert "not measured at concurrency 2" in r["disqualified"]["gappy"]
    lenient = recommend({"failing": failing, "deep": DEEP}, bands=[(1, 1)], max_error_rate=0.1)
    assert lenient[0]["best"] == "failing"
    none_left = recommend({"failing": failing}, bands=[(1, 4)])
    assert none_left[0]["best"] is None and "disqualified" in none_left[0]["reason"]


def test_nan_metric_disqualifies_and_rate_rows_are_ignored() -> None:
    nan_row = [row(1, float("nan"), 5.0)]
    rate_rows = [row(1, 1e6, 1.0, mode="rate"), row(1, 100, 5.0)]
    recs = recommend({"nan": nan_row, "rates": rate_rows}, bands=[(1, 1)])
    assert recs[0]["best"] == "rates" and recs[0]["values"]["rates"] == {"1": 100.0}
    assert "no output_throughput" in recs[0]["disqualified"]["nan"]


def test_ties_go_to_the_first_setting_listed() -> None:
    assert recommend({"b": DEEP, "a": DEEP}, bands=[(1, 16)])[0]["best"] == "b"


def test_recommend_rejects_an_unknown_objective() -> None:
    with pytest.raises(ValueError, match="objective 'speed'"):
        recommend({"a": DEEP}, objective="speed")  # type: ignore[arg-type]


def test_recommendation_table_names_winner_knobs_and_runner_up() -> None:
    recs = recommend({"s5_k1_d6": DEEP, "s3_k1_d4": SHALLOW}, bands=[(1, 4), (32, 64)],
                     reference=BASE)
    text = format_recommendations(recs, {"s5_k1_d6": {"num_steps": 5, "eagle_topk": 1,
                                                      "num_draft_tokens": 6}})
    first = text.splitlines()[1]
    assert "s5_k1_d6" in first and "5/1/6" in first and "s3_k1_d4 (0.7" in first
    assert "none: no closed-loop point" in text.splitlines()[2]


def setting(**kw) -> dict:
    return {"num_steps": 5, "eagle_topk": 1, "num_draft_tokens": 6, "url": "http://h:1"} | kw


def test_tune_config_rules() -> None:
    ok = TuneConfig.model_validate({"model": "m", "settings": [setting()]})
    assert ok.settings[0].label == "s5_k1_d6" and ok.bands == [(1, 4), (8, 16), (32, 64)]
    cases = [({"settings": [setting(), setting()]}, "repeat a setting"),
             ({"settings": [setting()], "bands": [[4, 2]]}, "1 <= low <= high"),
             ({"settings": [setting(url=None)]}, "have no url and tune.deployer is unset"),
             ({"settings": [setting()], "deployer": "nocolon"}, "'module:factory'"),
             ({"settings": [setting(num_draft_tokens=9)]}, "exceeds"),
             ({"settings": []}, "at least 1")]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            TuneConfig.model_validate({"model": "m", **extra})


class FakeDeployer:
    def __init__(self, port: int) -> None:
        self.port = port

    def deploy(self, s: SpecSetting) -> str:
        return f"http://127.0.0.1:{self.port}/{s.label}"

    def teardown(self, s: SpecSetting) -> None:
        return None


def test_load_deployer(monkeypatch) -> None:
    static = load_deployer(TuneConfig.model_validate({"model": "m", "settings": [setting()]}))
    assert isinstance(static, StaticDeployer)
    assert static.deploy(SpecSetting.model_validate(setting())) == "http://h:1"
    module = types.ModuleType("eyas_fake_deployers")
    module.make = FakeDeployer
    monkeypatch.setitem(sys.modules, "eyas_fake_deployers", module)
    tune = TuneConfig.model_validate({"model": "m", "settings": [setting(url=None)],
                                      "deployer": "eyas_fake_deployers:make",
                                      "deployer_args": {"port": 9}})
    assert load_deployer(tune).deploy(tune.settings[0]) == "http://127.0.0.1:9/s5_k1_d6"
    for name, message in (("eyas_fake_deployers:absent", "cannot be imported"),
                          ("collections:OrderedDict", "lacks deploy")):
        with pytest.raises(ValueError, match=message):
            load_deployer(tune.model_copy(update={"deployer": name}))


LT = {"endpoints": [{"name": "a", "url": "http://h:1", "model": "m"}]}


def test_job_output_follows_run_output() -> None:
    default = validate_config(LoadTestJobConfig, {"loadtest": LT})
    assert default.run.output == default.loadtest.output == "artifacts/loadtest"
    moved = validate_config(LoadTestJobConfig, {"run": {"output": "s3://b/x"}, "loadtest": LT})
    assert moved.loadtest.output == "s3://b/x"
    only_lt = validate_config(LoadTestJobConfig, {"loadtest": {**LT, "output": "/tmp/y"}})
    assert only_lt.run.output == "/tmp/y"
    with pytest.raises(ConfigError, match="name the same artifact but differ"):
        validate_config(LoadTestJobConfig, {"run": {"output": "a"}, "loadtest": {**LT, "output": "b"}})
    with pytest.raises(ConfigError, match="loadtest"):
        validate_config(LoadTestJobConfig, {"run": {"output": "a"}})


def test_artifact_hash_depends_on_the_tune_section_not_on_force() -> None:
    plain = validate_config(LoadTestJobConfig, {"loadtest": LT})
    forced = validate_config(LoadTestJobConfig, {"loadtest": LT, "run": {"force": True, "output": "artifacts/loadtest"}})
    tuned = validate_config(LoadTestJobConfig, {"loadtest": LT, "tune": {"model": "m", "settings": [setting()]}})
    assert plain.artifact_hash() == forced.artifact_hash() != tuned.artifact_hash()


def test_speedups_compare_with_the_first_endpoint_at_each_point() -> None:
    rows = [{"point": "c1", "endpoint": "base", "output_throughput": 100.0, "tpot_ms_median": 20.0,
             "ttft_ms_median": 50.0},
            {"point": "c1", "endpoint": "eagle", "output_throughput": 250.0, "tpot_ms_median": 8.0,
             "ttft_ms_median": 55.0},
            {"point": "c2", "endpoint": "base", "output_throughput": 0.0, "tpot_ms_median": None,
             "ttft_ms_median": float("nan")},
            {"point": "c2", "endpoint": "eagle", "output_throughput": 10.0, "tpot_ms_median": 8.0,
             "ttft_ms_median": 40.0}]
    s1, s2 = speedups(rows)
    assert s1 == {"point": "c1", "endpoint": "eagle", "baseline": "base", "throughput": 2.5,
                  "tpot": 2.5, "ttft": pytest.approx(50 / 55)}
    assert s2["throughput"] is None and s2["tpot"] is None and s2["ttft"] is None
