"""`ray job submit` as the README's "Local cluster" section runs it, on a real `ray start --head`.

A copy of the checkout (``jobs/``, ``platform/``, ``serve_apps/``, ``.gitignore``, with
``../shared`` beside it) is the head's working directory and is submitted with ``working_dir``
and ``{"env_vars": {"EYAS_HOME": <checkout>}}`` through the Jobs API: prepare_data ->
extract_features -> train_draft (4 steps) -> evaluate_draft on stories260k with the configs'
default RELATIVE outputs; then ``serve deploy serve_apps/stories260k.yaml`` (its replicas load the
relative ``artifacts/train/draft`` from the directory ``ray start`` ran in) and the load_test line
against it; then the pipeline line (serve + load test stages: the job serves both apps itself,
the EAGLE-3 app behind a key read from a file). The only edit to the shipped files is the HTTP
port (a free one for 8000, in the serve file and the load-test config alike). The artifacts
must land in ``<checkout>/artifacts/...`` (not in Ray's ``_ray_pkg_`` copy) and survive stopping
the cluster. Without ``EYAS_HOME`` the same submission fails with one line naming
``run.output``. The key must appear in no dashboard API answer, not in `ray list actors --detail`
and in no file of the cluster's session.

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

from conftest import files_containing, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
API_KEY = "eyas-test-key-7f3a9c"


def make_checkout(base: Path) -> Path:
    """``base/eyas`` (jobs, platform, serve_apps, .gitignore) with ``base/shared`` -> the real
    shared folder."""
    checkout = base / "eyas"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("jobs", "platform", "serve_apps"):
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


def user_shell_env() -> dict[str, str]:
    """This process's environment as a user's shell would have it: no Ray address or eyas
    home/assets from the test run, token auth off (as the README's local cluster)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EYAS_HOME", "EYAS_ASSETS")}
    return {**env, "RAY_AUTH_MODE": "disabled"}


def start_head(temp_dir: str, log: Path, cwd: Path) -> tuple[subprocess.Popen, int]:
    """`ray start --head` in ``cwd`` (the README runs it from the checkout root) with the venv
    active (its bin first on PATH), private ports, 2 CPUs."""
    ports = {flag: free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port",
                                             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--metrics-export-port", "--node-manager-port",
                                             "--object-manager-port", "--runtime-env-agent-port")}
    env = user_shell_env()
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(VENV_BIN.parent),
               RAY_USAGE_STATS_ENABLED="0")
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
           "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
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


def serve_cli(args: list[str], checkout: Path, dashboard_port: int) -> str:
    """``serve <args> --address <dashboard>`` run in the checkout; its stdout (fails on error)."""
    done = subprocess.run([str(VENV_BIN / "serve"), *args, "--address", f"http://127.0.0.1:{dashboard_port}"],
                          cwd=checkout, env=user_shell_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


def use_port(checkout: Path, port: int) -> None:
    """Point the shipped serve file and load-test config at ``port`` instead of 8000."""
    for rel in ("serve_apps/stories260k.yaml", "jobs/configs/load_test.yaml"):
        path = checkout / rel
        text = path.read_text()
        assert text.count(":8000/") + text.count("port: 8000") >= 1, rel
        path.write_text(text.replace(":8000/", f":{port}/").replace("port: 8000", f"port: {port}"))


def wait_serving(checkout: Path, dashboard_port: int, timeout_s: float = 240) -> None:
    """Until ``serve status`` shows both applications RUNNING."""
    import yaml

    deadline, apps = time.time() + timeout_s, {}
    while time.time() < deadline:
        apps = yaml.safe_load(serve_cli(["status"], checkout, dashboard_port)).get("applications") or {}
        if len(apps) == 2 and all(a["status"] == "RUNNING" for a in apps.values()):
            return
        if any(a["status"] == "DEPLOY_FAILED" for a in apps.values()):
            break
        time.sleep(3)
    pytest.fail(f"serve apps not RUNNING: {json.dumps(apps, default=str)[-3000:]}")


def secret(tmp_path: Path) -> Path:
    key_file = tmp_path / "secrets" / "api_key"
    key_file.parent.mkdir()
    key_file.write_text(API_KEY + "\n")
    return key_file


def pipeline_args(serve_port: int, key_file: Path) -> list[str]:
    """The README's pipeline line on the smoke config, serve + load test only, over the artifacts
    the single-stage jobs left in ``artifacts/`` (small load, a free port, a key on EAGLE-3)."""
    url = f"http://127.0.0.1:{serve_port}"
    endpoints = [{"name": "baseline", "url": f"{url}/baseline/v1", "model": "stories260k"},
                 {"name": "eagle3", "url": f"{url}/eagle3/v1", "model": "stories260k",
                  "api_key_file": str(key_file)}]
    return ["jobs/pipeline.py", "--config", "jobs/configs/pipeline_stories260k.yaml", "run.output=artifacts",
            "stages=[loadtest]", f"serve.port={serve_port}", f"serve.eagle3.api_key_file={key_file}",
            f"loadtest.endpoints={json.dumps(endpoints)}", "loadtest.concurrencies=[1]",
            "loadtest.requests_per_point=4", "loadtest.max_tokens=16"]


def assert_key_not_exposed(dashboard_port: int, temp_dir: str) -> None:
    """The EAGLE-3 app's key (read from a file) is in no dashboard API answer, not in
    `ray list actors --detail`, and in no file of the Ray session."""
    import httpx

    api = f"http://127.0.0.1:{dashboard_port}"
    for path in ("/api/v0/actors?detail=true&limit=10000", "/api/v0/tasks?detail=true&limit=10000",
                 "/api/v0/placement_groups?detail=true", "/api/serve/applications/", "/api/jobs/"):
        answer = httpx.get(api + path, timeout=60)
        assert answer.status_code == 200, (path, answer.status_code)
        assert API_KEY not in answer.text, path
    listed = subprocess.run([str(VENV_BIN / "ray"), "list", "actors", "--detail", "--limit", "10000",
                             "--address", api],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "ServeReplica" in listed.stdout, listed.stderr[-2000:]
    assert API_KEY not in listed.stdout + listed.stderr
    assert not (leaks := files_containing(Path(temp_dir), API_KEY)), leaks


def test_ray_job_submit_outputs_land_in_eyas_home(assets, tmp_path):
    import httpx

    checkout = make_checkout(tmp_path / "work")
    temp_dir = tempfile.mkdtemp(prefix="eyasray-", dir="/tmp")  # short: Ray's socket paths live there
    log = tmp_path / "ray_start.log"
    serve_port = free_port()
    use_port(checkout, serve_port)
    proc, port = start_head(temp_dir, log, checkout)
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

        status, logs = submit(client, checkout, [
            "jobs/evaluate_draft.py", "--config", "jobs/configs/evaluate_draft.yaml", "evaluate.max_depth=2",
            "evaluate.max_rows=4", "evaluate.max_length=64"], env_vars=home)
        assert status == "SUCCEEDED", logs[-5000:]

        # The README's serve deploy + load_test lines: the replicas find the relative draft path
        # in the directory `ray start` ran in; the load test's outputs land in artifacts/loadtest.
        serve_cli(["deploy", "serve_apps/stories260k.yaml"], checkout, port)
        wait_serving(checkout, port)  # a replica that cannot find its draft never runs
        info = httpx.get(f"http://127.0.0.1:{serve_port}/eagle3/v1/server_info", timeout=30)
        assert info.status_code == 200 and '"EAGLE3"' in info.text, info.text[-2000:]
        status, logs = submit(client, checkout, [
            "jobs/load_test.py", "--config", "jobs/configs/load_test.yaml", "loadtest.concurrencies=[1]",
            "loadtest.requests_per_point=4", "loadtest.max_tokens=16"], env_vars=home)
        assert status == "SUCCEEDED", logs[-5000:]
        serve_cli(["shutdown", "-y"], checkout, port)
        standalone = checkout / "artifacts" / "loadtest_standalone"
        (checkout / "artifacts" / "loadtest").rename(standalone)  # the pipeline writes loadtest/ too

        # The pipeline's serve stage under a job: both apps served by the job itself (the EAGLE-3
        # one behind a key read from a file, its draft a relative path resolved by the replicas
        # against EYAS_HOME), the load test against them, the apps deleted at the end.
        status, logs = submit(client, checkout, pipeline_args(serve_port, secret(tmp_path)), env_vars=home)
        assert status == "SUCCEEDED", logs[-5000:]
        assert_key_not_exposed(port, temp_dir)
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
        assert (art / "evaluate" / "manifest.json").is_file()
        for loadtest in ("loadtest_standalone", "loadtest"):
            rows = json.loads((art / loadtest / "summary.json").read_text())["rows"]
            assert [(r["endpoint"], r["completed"], r["failed"]) for r in rows] == [
                ("baseline", 4, 0), ("eagle3", 4, 0)], loadtest
        assert (art / "report.json").is_file()
        # ... and nothing was written into Ray's package copy of the working dir.
        packages = list(Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*"))
        assert not [p for p in packages if (p / "artifacts").exists()]
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"cluster + jobs {time.time() - t0:.0f}s (jobs {jobs_s:.0f}s)")
