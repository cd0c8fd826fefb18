"""`ray job submit` as the README's "Local cluster" section runs it, on a real `ray start --head`.

A copy of the checkout (``jobs/``, ``platform/``, ``.gitignore``, with ``../shared`` beside it)
is submitted with ``working_dir`` and ``{"env_vars": {"EYAS_HOME": <checkout>}}`` through the
Jobs API: prepare_data -> extract_features -> train_draft (4 steps) on stories260k with the
configs' default RELATIVE outputs. The artifacts must land in ``<checkout>/artifacts/...`` (not
in Ray's ``_ray_pkg_`` copy) and survive stopping the cluster. Without ``EYAS_HOME`` the same
submission fails with one line naming ``run.output``.

The head is private: its own ``--temp-dir`` and free ports, started with ``--block`` in its own
session; it is stopped by signalling that session and then only the processes whose command line
names its temp dir (never a bare ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def make_checkout(base: Path) -> Path:
    """``base/eyas`` (jobs, platform, .gitignore) with ``base/shared`` -> the real shared folder."""
    checkout = base / "eyas"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("jobs", "platform"):
        shutil.copytree(ROOT / name, checkout / name, ignore=ignore)
    shutil.copy(ROOT / ".gitignore", checkout / ".gitignore")
    (base / "shared").symlink_to((ROOT.parent / "shared").resolve())
    return checkout


def own_pids(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (this test's private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop only this test's cluster: SIGTERM to the `ray start --block` session, then SIGKILL
    whatever still names the private temp dir."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.time() + wait_s
        while time.time() < deadline and (proc.poll() is None or own_pids(temp_dir)):
            time.sleep(0.5)
        for pid in own_pids(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)


def start_head(temp_dir: str, log: Path) -> tuple[subprocess.Popen, int]:
    """`ray start --head` with the venv active (its bin first on PATH), private ports, 2 CPUs."""
    ports = {flag: free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port",
                                             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--metrics-export-port", "--node-manager-port",
                                             "--object-manager-port", "--runtime-env-agent-port")}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EYAS_HOME", "EYAS_ASSETS")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(VENV_BIN.parent),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
           "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, ports["--dashboard-port"]


def connect(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 120):
    from ray.job_submission import JobSubmissionClient

    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            client = JobSubmissionClient(f"http://127.0.0.1:{port}")
            client.list_jobs()
            return client
        except Exception as exc:  # the dashboard is still starting
            last = exc
            time.sleep(2)
    pytest.fail(f"the dashboard on :{port} did not answer in {timeout_s}s ({last}):\n{log.read_text()[-3000:]}")


def submit(client, checkout: Path, args: list[str], env_vars: dict[str, str] | None,
           timeout_s: float = 240) -> tuple[str, str]:
    """Submit ``python <args>`` with the checkout as working_dir; wait; return (status, logs)."""
    runtime_env: dict = {"working_dir": str(checkout)}
    if env_vars is not None:
        runtime_env["env_vars"] = env_vars
    job = client.submit_job(entrypoint="python " + " ".join(shlex.quote(a) for a in args), runtime_env=runtime_env)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = str(client.get_job_status(job).value)
        if status in TERMINAL:
            return status, client.get_job_logs(job)
        time.sleep(1)
    client.stop_job(job)
    pytest.fail(f"job {args[0]} still running after {timeout_s}s:\n{client.get_job_logs(job)[-3000:]}")


def test_ray_job_submit_outputs_land_in_eyas_home(assets, tmp_path):
    checkout = make_checkout(tmp_path / "work")
    temp_dir = tempfile.mkdtemp(prefix="eyasray-", dir="/tmp")  # short: Ray's socket paths live there
    log = tmp_path / "ray_start.log"
    proc, port = start_head(temp_dir, log)
    home = {"EYAS_HOME": str(checkout)}  # the README's --runtime-env-json
    sources = json.dumps([{"path": "assets:datasets/sft/llamafactory_alpaca_en_demo.json", "limit": 8}])
    t0 = time.time()
    try:
        client = connect(port, proc, log)
        started = time.time()

        # Without EYAS_HOME a relative run.output is refused, in one line, before anything is written.
        status, logs = submit(client, checkout, ["jobs/prepare_data.py", "--config", "jobs/configs/prepare_data.yaml"],
                              env_vars=None)
        assert status == "FAILED", logs[-3000:]
        assert "error: run.output='artifacts/data' is relative" in logs and "Traceback" not in logs, logs[-3000:]

        status, logs = submit(client, checkout, [
            "jobs/prepare_data.py", "--config", "jobs/configs/prepare_data.yaml",
            f"data.sources={sources}", "data.generation.max_new_tokens=16"], env_vars=home)
        assert status == "SUCCEEDED", logs[-5000:]
        assert f'"artifact": "{checkout / "artifacts" / "data"}"' in logs  # absolute URIs in the summary
        assert f'"data": "{checkout / "artifacts" / "data" / "data"}"' in logs

        status, logs = submit(client, checkout, [
            "jobs/extract_features.py", "--config", "jobs/configs/extract_features.yaml"], env_vars=home)
        assert status == "SUCCEEDED", logs[-5000:]

        status, logs = submit(client, checkout, [
            "jobs/train_draft.py", "--config", "jobs/configs/train_draft.yaml", "train.max_steps=4",
            "train.num_workers=1", "train.checkpoint_every=2", "train.batch_size=2", "train.max_length=64",
            "train.shuffle_buffer=4"], env_vars=home)
        assert status == "SUCCEEDED", logs[-5000:]
        assert f'"draft": "{checkout / "artifacts" / "train" / "draft"}"' in logs
        jobs_s = time.time() - started
    finally:
        stop_head(proc, temp_dir)
    try:
        assert not own_pids(temp_dir)

        # After the cluster is gone the artifacts are where the README says: <EYAS_HOME>/artifacts/...
        art = checkout / "artifacts"
        for stage in ("data", "features", "train"):
            assert (art / stage / "manifest.json").is_file(), stage
        assert list((art / "data" / "data").glob("*.parquet"))
        assert list((art / "features" / "train").glob("*.parquet"))
        assert (art / "train" / "draft" / "model.safetensors").is_file()
        assert json.loads((art / "train" / "manifest.json").read_text())["steps"] == 4
        # ... and nothing was written into Ray's package copy of the working dir.
        packages = list(Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*"))
        assert not [p for p in packages if (p / "artifacts").exists()]
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"cluster + jobs {time.time() - t0:.0f}s (jobs {jobs_s:.0f}s)")
