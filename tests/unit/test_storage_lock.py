"""One writer per artifact URI: a second writer is refused naming the holder; the lock of a run
that died is taken over; the manifest releases it (local paths; S3 in integration)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator

import pytest

from eyas import storage
from eyas.storage import Artifact, ArtifactLockedError

# A second process that takes the lock of the artifact at argv[1] and holds it until stdin closes.
HOLDER = ("import sys; from eyas import storage; storage.acquire_lock(sys.argv[1]); "
          "print('held', flush=True); sys.stdin.read()")


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


@contextlib.contextmanager
def held_by_another_process(uri: str) -> Iterator[subprocess.Popen]:
    """A child process holding the writer lock of ``uri`` until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, uri], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(30)


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    uri = str(tmp_path / "art")
    with held_by_another_process(uri) as holder:
        with pytest.raises(ArtifactLockedError) as err:
            Artifact(uri).prepare("h", force=False)
        message = str(err.value)
        assert "\n" not in message and uri in message and f"pid {holder.pid} on {platform.node()}" in message
    # The holder is gone: its lock is taken over at once.
    assert Artifact(uri).prepare("h", force=False) is True


def test_a_stale_lock_is_taken_over_and_the_manifest_releases_it(tmp_path):
    art = Artifact(str(tmp_path / "art"))
    lock = tmp_path / "art.lock"
    lock.write_text(json.dumps({"pid": dead_pid(), "host": platform.node(), "since": "2020-01-01T00:00:00Z"}))
    assert art.prepare("h", force=False) is True
    assert json.loads(lock.read_text())["pid"] == os.getpid() and storage.lock_uri(art.uri) == str(lock)
    assert art.prepare("h", force=False) is True  # re-entrant: a retry in the same process
    art.write_manifest("data", {}, "h")
    assert not lock.exists()
    assert art.prepare("h", force=False) is False  # a finished artifact is read, not locked
    assert not lock.exists()


def test_the_holders_data_survives_a_refused_writer(tmp_path):
    uri = str(tmp_path / "art")
    with held_by_another_process(uri):
        storage.write_bytes(storage.join(uri, "shard-0.bin"), b"x")  # the holder's partial output
        with pytest.raises(ArtifactLockedError):
            Artifact(uri).prepare("h", force=True)
        assert (tmp_path / "art" / "shard-0.bin").read_bytes() == b"x"
