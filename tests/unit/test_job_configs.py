"""Every job YAML parses and validates against its job's schema; its header shows the command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from eyas.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


def job_module(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_job_yaml_validates(path):
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    match = re.search(rf"python jobs/(\w+)\.py --config jobs/configs/{re.escape(path.name)}", header)
    assert match, f"{path.name}: the header must show its launch command (python jobs/<job>.py --config ...)"
    module = job_module(match.group(1))
    load_config(module.CONFIG_CLASS, path)


def test_every_job_has_a_default_config():
    for job in sorted((ROOT / "jobs").glob("*.py")):
        module = job_module(job.stem)
        assert Path(module.DEFAULT_CONFIG).is_file(), f"{job.name}: DEFAULT_CONFIG {module.DEFAULT_CONFIG} missing"
