"""The whole pipeline on the stories260k smoke config with tiny settings: every stage, real
Ray/Serve/HTTP (the SmolLM2 default takes ~30 minutes: it is measured by hand, see README)."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline_main():
    spec = importlib.util.spec_from_file_location("job_pipeline", ROOT / "jobs" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tiny_overrides(out: Path, port: int) -> list[str]:
    sources = [{"path": "assets:datasets/sft/llamafactory_alpaca_en_demo.json", "limit": 24},
               {"path": "assets:datasets/prompts/mt_bench_question.jsonl", "limit": 4}]
    return [f"run.output={out}", f"data.sources={json.dumps(sources)}", "data.generation.max_new_tokens=24",
            "train.max_steps=12", "train.num_workers=1", "train.checkpoint_every=6", "train.batch_size=4",
            "evaluate.max_depth=3", f"serve.port={port}",
            f"loadtest.endpoints=[{{name: baseline, url: 'http://127.0.0.1:{port}/baseline/v1', model: stories260k}},"
            f" {{name: eagle3, url: 'http://127.0.0.1:{port}/eagle3/v1', model: stories260k}}]",
            "loadtest.concurrencies=[1, 2]", "loadtest.requests_per_point=4", "loadtest.max_tokens=16"]


def test_pipeline_end_to_end(ray_local, stories260k, tmp_path, capsys):
    from ray import serve

    main = pipeline_main()
    argv = ["--config", str(ROOT / "jobs" / "configs" / "pipeline_stories260k.yaml"), *tiny_overrides(tmp_path, free_port())]
    try:
        report = main(argv)
    finally:
        serve.shutdown()
    data = report["data"]
    assert data["read"] == 28 == data["kept"] + data["quarantined"] + data["filtered"]
    assert report["train"]["steps"] == 12 and "acc_0" in report["train"]["final"]
    assert (tmp_path / "train" / "draft" / "model.safetensors").is_file()
    assert set(report["evaluate"]["tau"]) == {"head", "ngram", "head+ngram", "corpus", "head+ngram+corpus"}
    points = report["loadtest"]["points"]
    assert [p["point"] for p in points] == ["c1", "c2"]
    for p in points:
        assert p["baseline"]["output_throughput"] > 0 and p["eagle3"]["output_throughput"] > 0
        assert p["eagle3"]["acceptance_length"] >= 1.0 and p["speedup"]["tpot"] > 0
    assert (tmp_path / "report.json").is_file()
    printed = capsys.readouterr().out
    assert "eyas pipeline report" in printed and "offline tau head" in printed
