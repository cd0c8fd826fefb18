"""Where relative outputs land: ``$EYAS_HOME`` or the cwd, never silently inside Ray's temporary
working_dir copy (``_ray_pkg_<hash>``); assets found through ``$EYAS_HOME``; one-line job errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eyas import assets, runtime, storage
from eyas.config import ConfigError, RunConfig
from eyas.storage import ArtifactError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_home(monkeypatch):
    monkeypatch.delenv("EYAS_HOME", raising=False)
    monkeypatch.delenv("EYAS_ASSETS", raising=False)


@pytest.fixture
def ray_pkg(tmp_path, monkeypatch, no_home) -> Path:
    """The cwd a job gets under ``ray job submit --working-dir``."""
    pkg = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    return pkg


def test_relative_paths_resolve_against_cwd_without_home(tmp_path, monkeypatch, no_home):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("artifacts/data")[1] == str(tmp_path / "artifacts" / "data")
    assert storage.absolute_uri("./a/../b") == str(tmp_path / "b")
    assert storage.ray_package_dir() is None
    assert storage.check_output("artifacts/data") == str(tmp_path / "artifacts" / "data")


def test_relative_paths_resolve_against_eyas_home(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("EYAS_HOME", str(home))
    assert storage.resolve("artifacts/data")[1] == str(home / "artifacts" / "data")
    assert storage.resolve(str(elsewhere / "x"))[1] == str(elsewhere / "x")  # absolute paths unchanged
    assert storage.resolve("file://rel/x")[1] == str(home / "rel" / "x")
    storage.write_json("artifacts/t/m.json", {"ok": 1})
    assert json.loads((home / "artifacts" / "t" / "m.json").read_text()) == {"ok": 1}
    assert not (elsewhere / "artifacts").exists()


def test_remote_uris_are_untouched(ray_pkg):
    assert storage.check_output("s3://bucket/eyas/data") == "s3://bucket/eyas/data"
    assert storage.absolute_uri("gs://b/x") == "gs://b/x"
    assert not storage.is_relative_local("s3://bucket/x")


def test_bad_eyas_home_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EYAS_HOME", "relative/checkout")
    with pytest.raises(ArtifactError, match="EYAS_HOME='relative/checkout' must be an absolute path"):
        storage.resolve("artifacts/data")
    monkeypatch.setenv("EYAS_HOME", str(tmp_path / "missing"))
    with pytest.raises(ArtifactError, match="is not a directory on this node"):
        storage.resolve("artifacts/data")


def test_relative_output_in_ray_package_is_refused(ray_pkg):
    assert storage.ray_package_dir() == str(ray_pkg)
    with pytest.raises(ArtifactError) as err:
        storage.check_output("artifacts/data", "run.output")
    msg = str(err.value)
    assert msg.startswith("run.output='artifacts/data' is relative") and "\n" not in msg
    assert "EYAS_HOME" in msg and "s3://" in msg and str(ray_pkg) in msg
    # absolute outputs are fine there, and so are relative ones once EYAS_HOME names the checkout
    assert storage.check_output("/abs/out") == "/abs/out"


def test_relative_output_in_ray_package_with_home(ray_pkg, tmp_path, monkeypatch):
    monkeypatch.setenv("EYAS_HOME", str(tmp_path))
    assert storage.check_output("artifacts/data") == str(tmp_path / "artifacts" / "data")
    assert runtime.output_uri(RunConfig(output="artifacts/data")) == str(tmp_path / "artifacts" / "data")


def test_assets_found_beside_eyas_home(tmp_path, monkeypatch, no_home):
    home = tmp_path / "work" / "eyas"
    home.mkdir(parents=True)
    (tmp_path / "work" / "shared" / "assets" / "models").mkdir(parents=True)
    monkeypatch.setenv("EYAS_HOME", str(home))
    monkeypatch.setattr(assets, "REPO_ROOT", tmp_path / "pkg")  # as in Ray's package copy
    monkeypatch.chdir(tmp_path)
    assert assets.assets_root() == tmp_path / "work" / "shared" / "assets"
    assert assets.resolve_asset("assets:models/x", "data.target") == str(tmp_path / "work" / "shared" / "assets" / "models" / "x")


def test_missing_assets_error_names_key_and_env_vars(tmp_path, monkeypatch, no_home):
    monkeypatch.setattr(assets, "REPO_ROOT", tmp_path / "a" / "pkg")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        assets.resolve_asset("assets:models/stories260k", "data.target")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data.target='assets:models/stories260k'")
    assert "EYAS_ASSETS" in msg and "EYAS_HOME" in msg


def test_relative_inputs_that_exist_under_home_resolve_there(tmp_path, monkeypatch):
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.setenv("EYAS_HOME", str(tmp_path))
    assert assets.resolve_asset("models/m", "data.target") == str(tmp_path / "models" / "m")
    assert assets.resolve_asset("org/name", "data.target") == "org/name"  # not there: a hub id stays
    assert assets.resolve_asset("s3://b/m", "data.target") == "s3://b/m"
    monkeypatch.delenv("EYAS_HOME")
    assert assets.resolve_asset("models/m", "data.target") == "models/m"  # unchanged without a home


def test_job_summary_prints_absolute_outputs(tmp_path, monkeypatch, no_home):
    monkeypatch.chdir(tmp_path)
    manifest = {"counts": {"read": 3}, "outputs": {"draft": "artifacts/train/draft", "files": ["a/b", "s3://x/y"],
                                                   "none": None}}
    out = runtime.job_summary(manifest, ("counts", "outputs", "absent"), str(tmp_path / "artifacts" / "train"))
    assert out["artifact"] == str(tmp_path / "artifacts" / "train")
    assert out["outputs"] == {"draft": str(tmp_path / "artifacts" / "train" / "draft"),
                              "files": [str(tmp_path / "a" / "b"), "s3://x/y"], "none": None}
    assert "absent" not in out and out["counts"] == {"read": 3}


def test_user_error_unwraps_ray_task_errors():
    from ray.exceptions import RayTaskError

    cause = ConfigError("data.target='x': nothing there")
    wrapped = RayTaskError("fn", "Traceback (most recent call last): ...", cause).as_instanceof_cause()
    assert runtime.user_error(wrapped) == "data.target='x': nothing there"
    try:
        try:
            raise ArtifactError("features.data='d' has no manifest.json")
        except ArtifactError as exc:
            raise RuntimeError("stage failed") from exc
    except RuntimeError as exc:
        assert runtime.user_error(exc) == "features.data='d' has no manifest.json"
    assert runtime.user_error(ValueError("a bug")) is None


def test_cli_prints_one_line_and_exits_2(capsys):
    def main():
        raise ConfigError("run.output='x' is relative")

    with pytest.raises(SystemExit) as exit_:
        runtime.cli(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: run.output='x' is relative\n"

    def buggy():
        raise ValueError("a bug keeps its traceback")

    with pytest.raises(ValueError):
        runtime.cli(buggy)


def test_job_refuses_relative_output_in_ray_package_before_ray_starts(tmp_path):
    """The real job script, run from a ``_ray_pkg_`` folder as Ray does: exit 2, one line, no traceback."""
    pkg = tmp_path / "working_dir_files" / "_ray_pkg_feedbeef"
    pkg.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("EYAS_HOME", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train_draft.py"), "--config",
                           str(ROOT / "jobs" / "configs" / "train_draft.yaml")],
                          cwd=pkg, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run.output='artifacts/train' is relative"), proc.stderr
    assert not (pkg / "artifacts").exists()


def test_ray_data_progress_is_off_off_a_terminal_and_memory_advice_always(monkeypatch) -> None:
    from ray.data import DataContext

    from eyas.runtime import quiet_ray_data

    ctx = DataContext.get_current()
    memory = ctx.issue_detectors_config.high_memory_detector_config
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setattr(memory, "detection_time_interval_s", 30)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    quiet_ray_data()
    assert ctx.enable_progress_bars is True and memory.detection_time_interval_s == -1
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    quiet_ray_data()
    assert ctx.enable_progress_bars is False
