"""The writer lock on a real S3 server (SeaweedFS on loopback): a lock object is refused while
its holder may live, taken over when it names a dead process of this host, deleted by the
manifest."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from eyas import storage
from eyas.storage import Artifact, ArtifactLockedError

pytestmark = pytest.mark.integration


def holder(pid: int, host: str) -> bytes:
    return json.dumps({"pid": pid, "host": host, "token": "t", "since": "2020-01-01T00:00:00Z"}).encode()


def test_a_live_lock_object_refuses_a_second_writer(s3_prefix):
    art = Artifact(f"{s3_prefix}/art")
    lock = storage.lock_uri(art.uri)
    storage.write_bytes(lock, holder(4242, "another-host"))
    with pytest.raises(ArtifactLockedError, match=rf"pid 4242 on another-host .*delete {lock}"):
        art.prepare("h", force=False)
    storage.write_bytes(lock, holder(os.getppid(), platform.node()))  # alive, here
    with pytest.raises(ArtifactLockedError):
        art.prepare("h", force=False)


def test_a_dead_holders_lock_object_is_taken_over_and_released(s3_prefix):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    art = Artifact(f"{s3_prefix}/art")
    lock = storage.lock_uri(art.uri)
    assert lock == f"{s3_prefix}/art.lock"
    storage.write_bytes(lock, holder(int(dead.stdout), platform.node()))
    assert art.prepare("h", force=False) is True
    assert json.loads(storage.read_bytes(lock))["pid"] == os.getpid()
    art.write_manifest("data", {}, "h")
    assert not storage.exists(lock)
