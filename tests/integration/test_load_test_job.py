"""The load-test job (jobs/load_test.py) and speculation tuning against real HTTP servers whose
tokens arrive on a known schedule (tests/schedule_server.py): the reported speedups follow the
schedules, the files are written, a rerun is a no-op unless forced, and the tuning sweep
deploys, measures and tears down each setting and recommends the fastest one per band."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from eyas import storage
from eyas.loadtest import LoadTestConfig
from eyas.loadtest.tuning import SpecSetting, TuneConfig, tune_settings
from eyas.storage import ArtifactError
from schedule_server import ScheduleServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TTFT_MS = 30.0
SLOW = {"ttft_ms": TTFT_MS, "gap_ms": 20.0, "tokens_per_chunk": 1}  # the baseline: 1 token a step
FAST = {"ttft_ms": TTFT_MS, "gap_ms": 8.0, "tokens_per_chunk": 3}  # "EAGLE-3": 2.5x faster TPOT
MAX_TOKENS = 12
SMALL = ["loadtest.requests_per_point=4", f"loadtest.max_tokens={MAX_TOKENS}",
         "loadtest.num_client_actors=2", "loadtest.client_actor_cpus=0.25",
         "loadtest.workload.num_prompts=8", "loadtest.progress=false"]


def load_job():
    spec = importlib.util.spec_from_file_location("job_load_test", ROOT / "jobs" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def servers():
    slow, fast = ScheduleServer(), ScheduleServer()
    try:
        yield slow, fast
    finally:
        slow.close()
        fast.close()


def endpoints_override(slow: ScheduleServer, fast: ScheduleServer) -> str:
    return (f'loadtest.endpoints=[{{name: baseline, url: "{slow.url}/v1", model: m}}, '
            f'{{name: eagle3, url: "{fast.url}/v1", model: m}}]')


def e2e_ms(sched: dict, n: int = MAX_TOKENS) -> float:
    return sched["ttft_ms"] + (n - 1) * sched["gap_ms"]


def test_job_speedup_follows_the_schedules_and_rerun_is_a_noop(ray_local, servers, tmp_path,
                                                              capsys) -> None:
    slow, fast = servers
    slow.configure(**SLOW)
    fast.configure(**FAST)
    job = load_job()
    argv = ["--config", str(ROOT / "jobs" / "configs" / "load_test.yaml"),
            f"run.output={tmp_path / 'lt'}", endpoints_override(slow, fast),
            "loadtest.concurrencies=[1,4]", *SMALL, "loadtest.max_tokens=24"]  # TPOT over 23 gaps
    out = job.main(argv)
    assert out.ran and [s["point"] for s in out.speedups] == ["c1", "c4"]
    for s in out.speedups:
        assert s["endpoint"] == "eagle3" and s["baseline"] == "baseline"
        assert s["tpot"] == pytest.approx(SLOW["gap_ms"] / FAST["gap_ms"], rel=0.05), s
        # closed loop: throughput ~ 1 / E2E (490 vs 214 ms here), less precisely than TPOT
        assert s["throughput"] == pytest.approx(e2e_ms(SLOW, 24) / e2e_ms(FAST, 24), rel=0.15), s
    for r in out.rows:
        assert r["failed"] == 0 and r["num_requests"] == 4
    printed = capsys.readouterr().out
    assert "x TPOT" in printed and "tpot_vs_concurrency.png" in printed
    for name in ("summary_json", "summary_csv", "requests", "tpot_vs_concurrency",
                 "throughput_vs_concurrency", "manifest"):
        assert Path(out.files[name]).is_file(), name

    slow.configure(**SLOW)  # resets the request counters
    again = job.main(argv)
    assert not again.ran and slow.stats()["requests"] == 0
    assert again.speedups == out.speedups
    assert "nothing measured" in capsys.readouterr().out
    with pytest.raises(ArtifactError, match="another config"):
        job.main([*argv, "loadtest.requests_per_point=3"])
    forced = job.main([*argv, "run.force=true", "loadtest.concurrencies=[2]"])
    assert forced.ran and slow.stats()["requests"] == 2 + 4 and len(forced.rows) == 2


SETTINGS = [SpecSetting(num_steps=3, eagle_topk=1, num_draft_tokens=4),
            SpecSetting(num_steps=5, eagle_topk=1, num_draft_tokens=6),
            SpecSetting(num_steps=7, eagle_topk=1, num_draft_tokens=8)]
GAP_MS = {"s3_k1_d4": 16.0, "s5_k1_d6": 8.0, "s7_k1_d8": 12.0}  # the "deployment" per setting


def test_tune_settings_deploys_each_setting_and_recommends_the_fastest(ray_local, servers,
                                                                      tmp_path) -> None:
    """One server stands in for the deployment: deploy(setting) reconfigures its schedule."""
    slow, fast = servers
    slow.configure(**SLOW)
    calls: list[str] = []

    def deploy(s: SpecSetting) -> str:
        calls.append(f"deploy {s.label}")
        fast.configure(ttft_ms=TTFT_MS, gap_ms=GAP_MS[s.label], tokens_per_chunk=s.num_steps)
        return fast.url

    def teardown(s: SpecSetting) -> None:
        calls.append(f"teardown {s.label}")

    loadtest = LoadTestConfig.model_validate({
        "endpoints": [{"name": "baseline", "url": slow.url, "model": "m"}],
        "concurrencies": [1, 4], "requests_per_point": 4, "max_tokens": MAX_TOKENS,
        "num_client_actors": 2, "client_actor_cpus": 0.25, "progress": False,
        "workload": {"num_prompts": 8}, "output": str(tmp_path / "tune")})
    tune = TuneConfig(model="m", settings=SETTINGS, bands=[(1, 2), (4, 8), (16, 64)],
                      deployer="unused:by_this_test")
    res = tune_settings(loadtest, tune, deploy, teardown)

    assert calls == [f"{verb} {s.label}" for s in SETTINGS for verb in ("deploy", "teardown")]
    assert [(r["band"], r["best"]) for r in res.recommendations] == [
        ("1-2", "s5_k1_d6"), ("4-8", "s5_k1_d6"), ("16-64", None)]
    for point in ("c1", "c4"):  # TPOT follows each deployment's schedule
        tpot = {r["endpoint"]: r["tpot_ms_median"] for r in res.rows if r["point"] == point}
        assert tpot["s5_k1_d6"] < min(tpot["s7_k1_d8"], tpot["s3_k1_d4"]), (point, tpot)
        if point == "c1":  # loose: at c4 a 2-core box shared with other work delays the streams
            for label, gap in GAP_MS.items():
                assert tpot[label] == pytest.approx(gap, rel=0.25), (point, label, tpot)
    band = res.recommendations[0]
    assert band["scores"]["s3_k1_d4"] == pytest.approx(
        (TTFT_MS + 11 * 8) / (TTFT_MS + 11 * 16), rel=0.2)  # throughput ~ 1 / E2E
    assert band["speedup_vs_reference"] == pytest.approx(e2e_ms(SLOW) / e2e_ms(FAST), rel=0.2)

    doc = json.loads(Path(res.files["tuning"]).read_text())
    assert [r["best"] for r in doc["recommendations"]] == ["s5_k1_d6", "s5_k1_d6", None]
    assert doc["settings"]["s7_k1_d8"] == SETTINGS[2].knobs()
    manifest = storage.Artifact(str(tmp_path / "tune")).manifest()
    assert manifest["stage"] == "loadtest_tuning" and manifest["recommendations"]["1-2"] == "s5_k1_d6"
    for label in GAP_MS:
        assert storage.Artifact(str(tmp_path / "tune" / "settings" / label)).is_complete()
    assert Path(res.files["tpot_vs_concurrency"]).is_file()


def test_tuning_job_with_deployed_settings(ray_local, servers, tmp_path, capsys) -> None:
    """The job's tune: section with settings already serving at their URLs; a rerun is a no-op."""
    slow, fast = servers
    slow.configure(**SLOW)
    fast.configure(**FAST)
    job = load_job()
    tune = (f'tune={{model: m, bands: [[1, 4]], measure_reference: false, settings: ['
            f'{{num_steps: 3, eagle_topk: 1, num_draft_tokens: 4, url: "{slow.url}"}}, '
            f'{{num_steps: 7, eagle_topk: 1, num_draft_tokens: 8, url: "{fast.url}"}}]}}')
    argv = ["--config", str(ROOT / "jobs" / "configs" / "load_test.yaml"),
            f"run.output={tmp_path / 'tj'}", "loadtest.concurrencies=[2]", tune, *SMALL]
    out = job.main(argv)
    assert out.ran and out.recommendations[0]["best"] == "s7_k1_d8"
    assert "recommended speculation setting" in capsys.readouterr().out
    again = job.main(argv)
    assert not again.ran and again.recommendations == out.recommendations
    printed = capsys.readouterr().out
    assert "nothing measured" in printed and "7/1/8" in printed
